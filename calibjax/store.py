"""Files on disk: atomic writes, finished chunks, reading them back.

Layout of a results directory (the tables' columns are in ``calibjax.tables``)::

    manifest.json          sweep text and hash, plot settings, versions, devices, timings
    runs.parquet           one row per run (settings, status, bayes_loss, mutual_info)
    metrics.parquet        run x checkpoint           density.parquet    ... x log10-density bin
    calibration.parquet    ... x confidence bin       curves.parquet     ... x point x class
    estimators.parquet     ... x estimator x n x draw recalibrated.parquet  run x checkpoint (optional)
    summary.parquet, summary_by_setting.parquet, estimator_benchmark.parquet
    chunks/<id>/*.parquet  the same tables for each finished chunk (what resume reads)
    shards/K-of-N/         a shard's manifest and chunks
    figures/*.png

A chunk is written into a temporary directory and renamed into place; it counts
as finished only when its ``chunk.json`` (its run_ids and tables, written last)
lists tables that are all there. Every other file is written to a temporary
name and renamed. Temporary names and lock files (``chunks/.lock-<id>``, one per
chunk being trained) carry their writer's host and pid: only debris of dead
writers of this host is removed, so processes sharing a directory cooperate.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

HOST = socket.gethostname()
CHUNK_ID = re.compile(r"^g\d{3}-r\d{7}-n\d+-[0-9a-f]{8}$")   # planning.Chunk.chunk_id
SHARD_PART = re.compile(r"^\d+-of-\d+$")
LOCK_STALE_S = 120.0   # a lock whose holder has not touched it for this long is abandoned
HEARTBEAT_S = 20.0


class CorruptResults(ValueError):
    """A results file calibjax cannot read; the message names it and the way out."""


def _writer() -> str:
    """This process, as temporary names and locks record it: host and pid."""
    return f"{HOST}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # a PermissionError also means the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _dead_local_writer(tag: str) -> bool:
    """True if ``tag`` ("<host>-<pid>...", from a .tmp- name or a lock) names a process of this
    host that no longer runs. Writers on other hosts cannot be checked and count as alive."""
    if not tag.startswith(HOST + "-"):
        return False
    pid = tag[len(HOST) + 1:].split("-")[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def in_flight(name: str) -> bool:
    """True for the name of a temporary file of a live calibjax writer on this host (``.tmp-<host>-<pid>-``)."""
    prefix = f".tmp-{HOST}-"
    pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
    return pid.isdigit() and _pid_alive(int(pid))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_prefix() -> str:
    return f".tmp-{_writer()}-"


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path to path (same directory, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


# ---------------------------------------------------------------- chunks

def chunk_info(d: Path) -> dict | None:
    """A finished chunk's chunk.json (written last), or None unless it lists tables that are all there."""
    try:
        info = json.loads((d / "chunk.json").read_text())
        return info if all((d / f"{name}.parquet").is_file() for name in info["tables"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def chunk_complete(d: Path) -> bool:
    return chunk_info(d) is not None


def write_chunk(out: Path, chunk_id: str, tables: dict[str, pd.DataFrame], run_ids, run_hashes) -> bool:
    """Write one finished chunk's tables as a unit: temp directory, then rename.

    Returns False (and writes nothing) if another process finished the same chunk first. An
    unfinished chunk of that name (a table missing or unreadable) is moved aside to
    ``chunks/.broken-<id>-<writer>``, kept for inspection, not deleted.
    """
    chunks = out / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=chunks))
    try:
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "chunk.json").write_text(json.dumps({"tables": sorted(tables), "run_ids": [int(i) for i in run_ids],
                                                    "run_hashes": list(run_hashes), "writer": _writer()}) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        target = chunks / chunk_id
        if target.exists():
            if chunk_complete(target):
                shutil.rmtree(tmp)
                return False
            target.rename(chunks / f".broken-{chunk_id}-{_writer()}")
        os.replace(tmp, target)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ChunkLock:
    """At most one process trains a chunk: ``chunks/.lock-<id>``, created exclusively, names its
    holder and is touched every HEARTBEAT_S while held. A lock whose holder is dead (same host) or
    silent for LOCK_STALE_S (any host) is taken over."""

    def __init__(self, out: Path, chunk_id: str):
        self.path = Path(out) / "chunks" / f".lock-{chunk_id}"
        self._stop = threading.Event()
        self._thread = None

    def _stale(self) -> bool:
        try:
            holder = self.path.read_text().strip()
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False  # released meanwhile: try again
        return age > LOCK_STALE_S or _dead_local_writer(holder)

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)  # the holder is gone: take over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(_writer() + "\n")
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return True
        return False

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self):
        self._stop.set()
        try:
            if self.path.read_text().strip() == _writer():
                self.path.unlink()
        except OSError:
            pass

    def held_elsewhere(self) -> bool:
        return self.path.exists() and not self._stale()


def _owners(out: Path) -> dict[Path, dict[int, str]]:
    """Per finished chunk (its own and its shard parts'), the runs it owns (the run_id it was
    written with -> the run's hash); a run finished twice (say, by two shard layouts) counts once."""
    out = Path(out)
    dirs = sorted((p for p in [*out.glob("chunks/*"), *out.glob("shards/*/chunks/*")]
                   if p.is_dir() and CHUNK_ID.match(p.name)), key=lambda p: (p.name, str(p)))
    owners, seen = {}, set()
    for d in dirs:
        info = chunk_info(d)
        if info is None:
            continue
        owned = {int(i): h for i, h in zip(info["run_ids"], info.get("run_hashes", ()), strict=True) if h not in seen}
        seen.update(owned.values())
        owners[d] = owned
    return owners


def finished_hashes(out: Path) -> set[str]:
    """Identities (sweep.Sweep.hashes) of the runs finished in a results directory."""
    return {h for owned in _owners(out).values() for h in owned.values()}


def read_chunk_tables(out: Path, names) -> dict[str, pd.DataFrame | None]:
    """Each named table joined over all finished chunks, each run once, in chunk order, with a
    ``run_hash`` column (the run_id is the one the chunk was written with); None if no chunk has it."""
    owners = _owners(out)  # read once for all tables
    tables = {}
    for name in names:
        parts = []
        for d, owned in owners.items():
            p = d / f"{name}.parquet"
            if owned and p.exists():
                try:
                    df = pd.read_parquet(p)
                except Exception as e:  # pyarrow raises several kinds for a damaged file
                    raise CorruptResults(f"{p}: cannot read ({type(e).__name__}); move that chunk directory "
                                         "away and rerun the same command to train its runs again") from None
                df = df[df["run_id"].isin(owned)]
                parts.append(df.assign(run_hash=df["run_id"].map(owned)))
        parts = [p for p in parts if len(p)]
        tables[name] = pd.concat(parts, ignore_index=True) if parts else None
    return tables


def clean_debris(out: Path) -> None:
    """Remove temporary files and locks that dead processes of this host left behind; those of
    live processes, or of other hosts, are left alone."""
    out = Path(out)
    for base in (out, out / "chunks", *out.glob("shards/*"), *out.glob("shards/*/chunks")):
        if base.is_dir():
            for p in [*base.glob(".tmp-*"), *base.glob(".lock-*")]:
                owner = p.name[len(".tmp-"):] if p.name.startswith(".tmp-") else _read(p)
                if owner and _dead_local_writer(owner):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


FINAL_FILES = ("runs", "metrics", "density", "calibration", "curves", "estimators", "recalibrated", "summary",
               "summary_by_setting", "estimator_benchmark")


def remove_results(out: Path) -> None:
    """Delete what calibjax wrote in a results directory: final tables, finished chunks, shard
    parts, figures (PNG) and the manifest. Anything else stays; so does a folder left non-empty."""
    out = Path(out)
    for part in [out, *(p for p in out.glob("shards/*") if SHARD_PART.match(p.name))]:
        for d in part.glob("chunks/*"):
            if d.is_dir() and CHUNK_ID.match(d.name) and all(
                    f.suffix == ".parquet" or f.name == "chunk.json" for f in d.iterdir()):
                shutil.rmtree(d)
        _rmdir_if_empty(part / "chunks")
        (part / "manifest.json").unlink(missing_ok=True)
        if part != out:
            _rmdir_if_empty(part)
    _rmdir_if_empty(out / "shards")
    for name in FINAL_FILES:
        (out / f"{name}.parquet").unlink(missing_ok=True)
    for p in out.glob("figures/*.png"):
        p.unlink()
    _rmdir_if_empty(out / "figures")


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def read_manifest(out: Path) -> dict | None:
    p = Path(out) / "manifest.json"
    if not p.exists():
        return None
    try:
        manifest = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CorruptResults(f"{p}: not a readable calibjax manifest ({e}); move the directory away, or use "
                             "--out to write elsewhere") from None
    if not isinstance(manifest, dict) or "sweep_sha256" not in manifest:
        raise CorruptResults(f"{p}: not a calibjax manifest (no sweep_sha256); move the directory away, or use "
                             "--out to write elsewhere")
    return manifest


def load_results(out: str | Path) -> dict[str, pd.DataFrame]:
    """The final tables of a results directory, by name (runs, metrics, density, calibration, curves,
    estimators, recalibrated, summary, summary_by_setting, estimator_benchmark): those present.

    Only calibjax's own table names are read, never another writer's temporary file (``.tmp-*``,
    still being written while processes share the directory) or a file of the user's; each is read
    from one snapshot of its bytes, so a concurrent atomic replace cannot mix two versions.
    """
    out = Path(out)
    found = {}
    for name in FINAL_FILES:
        p = out / f"{name}.parquet"
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            continue
        try:
            found[name] = pd.read_parquet(io.BytesIO(data))
        except Exception as e:  # pyarrow raises several kinds for a damaged file
            raise CorruptResults(f"{p}: cannot read ({type(e).__name__}); rerun the sweep's command (or "
                                 f"calibjax merge {out}) to write it again") from None
    return found
