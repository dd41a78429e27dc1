"""Files on disk: atomic writes, finished chunks, reading them back.

Layout of a results directory (the tables' columns are in ``calibjax.storage.tables``)::

    manifest.json          sweep text and hash, plot settings, versions, devices, timings
    runs.parquet           one row per run (settings, status, bayes_loss, mutual_info)
    metrics.parquet        run x checkpoint           density.parquet    ... x log10-density bin
    calibration.parquet    ... x confidence bin       curves.parquet     ... x point x class
    estimators.parquet     ... x estimator x n x draw recalibrated.parquet  run x checkpoint (optional)
    summary.parquet, summary_by_setting.parquet, estimator_benchmark.parquet
    chunks/<id>/*.parquet  the same tables for each finished chunk (what resume reads; the final
                           tables are streamed from them chunk by chunk, never held whole)
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

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from calibjax.errors import CalibjaxError

HOST = socket.gethostname()
CHUNK_ID = re.compile(r"^g\d{3}-r\d{7}-n\d+-[0-9a-f]{8}$")  # planning.Chunk.chunk_id
SHARD_PART = re.compile(r"^\d+-of-\d+$")
LOCK_STALE_S = 120.0  # a lock whose holder has not touched it for this long is abandoned
HEARTBEAT_S = 20.0


class CorruptResults(CalibjaxError):
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


def dead_local_writer(tag: str) -> bool:
    """True if ``tag`` ("<host>-<pid>...", from a .tmp- name or a lock) names a process of this
    host that no longer runs. Writers on other hosts cannot be checked and count as alive."""
    if not tag.startswith(HOST + "-"):
        return False
    pid = tag[len(HOST) + 1 :].split("-")[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def in_flight(name: str) -> bool:
    """True for the name of a temporary file of a live calibjax writer on this host (``.tmp-<host>-<pid>-``)."""
    prefix = f".tmp-{HOST}-"
    pid = name[len(prefix) :].split("-")[0] if name.startswith(prefix) else ""
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


def parquet_options(columns: list[str], floats: set[str]) -> dict:
    """Dictionary encoding and row-group statistics (what filters skip row groups by) for all but
    the float columns: a float column of results has nearly as many values as rows, and encoding it
    by dictionary made writing slower and larger (docs/performance.md, "Planning constants")."""
    keyed = [c for c in columns if c not in floats]
    return {"use_dictionary": keyed, "write_statistics": keyed}


def to_parquet(df: pd.DataFrame, path) -> None:
    floats = {c for c in df.columns if df[c].dtype.kind == "f"}
    df.to_parquet(path, index=False, **parquet_options(list(df.columns), floats))


ROWS_PER_GROUP = 1 << 18  # rows per parquet row group of a large table (what a filter skips by)


def write_parquet(path: Path, df: pd.DataFrame, rows_per_group: int = ROWS_PER_GROUP) -> None:
    """A table, atomically; a large one in row groups converted one at a time (arrow's copy of a
    million-row summary would otherwise double its memory)."""
    if len(df) <= rows_per_group:
        write_atomic(path, lambda tmp: to_parquet(df, tmp))
        return

    def write(tmp):
        writer = None
        for start in range(0, len(df), rows_per_group):
            part = pa.Table.from_pandas(
                df.iloc[start : start + rows_per_group], preserve_index=False, schema=writer.schema if writer else None
            )
            writer = _write_group(tmp, writer, [part])
        writer.close()

    write_atomic(path, write)


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


def write_chunk_tables(out: Path, chunk_id: str, tables: dict[str, pd.DataFrame], run_ids, run_hashes) -> bool:
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
            to_parquet(df, tmp / f"{name}.parquet")
        (tmp / "chunk.json").write_text(
            json.dumps(
                {
                    "tables": sorted(tables),
                    "run_ids": [int(i) for i in run_ids],
                    "run_hashes": list(run_hashes),
                    "writer": _writer(),
                }
            )
            + "\n"
        )
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


def lock_state(path: Path) -> tuple[str, float, bool] | None:
    """A chunk lock's holder, the seconds since its last heartbeat, and whether it is live (touched
    within LOCK_STALE_S by a process not known dead); None once it is gone."""
    try:
        holder = path.read_text().strip()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    return holder, age, age <= LOCK_STALE_S and not dead_local_writer(holder)


def live_locks(part: Path) -> list[tuple[str, str, float]]:
    """(chunk_id, holder, age) of the chunks being trained now in a results directory or shard part."""
    return [
        (p.name[len(".lock-") :], s[0], s[1])
        for p in sorted(Path(part).glob("chunks/.lock-*"))
        if (s := lock_state(p)) is not None and s[2]
    ]


class ChunkLock:
    """At most one process trains a chunk: ``chunks/.lock-<id>``, created exclusively, names its
    holder and is touched every HEARTBEAT_S while held. A lock whose holder is dead (same host) or
    silent for LOCK_STALE_S (any host) is taken over."""

    def __init__(self, out: Path, chunk_id: str):
        self.path = Path(out) / "chunks" / f".lock-{chunk_id}"
        self._stop = threading.Event()
        self._thread = None

    def _stale(self) -> bool:
        state = lock_state(self.path)
        return state is not None and not state[2]  # (gone meanwhile: not stale, try again)

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


def finished_chunks(out: Path) -> dict[Path, dict[int, str]]:
    """Per finished chunk (its own and its shard parts'), the runs it owns (the run_id it was
    written with -> the run's hash); a run finished twice (say, by two shard layouts) counts once."""
    out = Path(out)
    dirs = sorted(
        (p for p in [*out.glob("chunks/*"), *out.glob("shards/*/chunks/*")] if p.is_dir() and CHUNK_ID.match(p.name)),
        key=lambda p: (p.name, str(p)),
    )
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
    return {h for owned in finished_chunks(out).values() for h in owned.values()}


def read_parquet(p: Path, columns=None, filters=None, hint: str = "") -> pd.DataFrame:
    """One table, read through a single open file (a concurrent atomic replace cannot mix two
    versions); only ``columns`` and the rows that pass ``filters`` (pyarrow's form) are built. A
    damaged file is a CorruptResults naming it (and ``hint``, the way out)."""
    # Arrow's buffers are freed column by column as pandas takes them: a large table is not held twice.
    return _read_arrow(p, columns, filters, hint).to_pandas(split_blocks=True, self_destruct=True)


def _read_arrow(p: Path, columns=None, filters=None, hint: str = "") -> pa.Table:
    try:
        # Arrow's own file (one descriptor, like a Python file): reading through a Python file object
        # let pyarrow's I/O threads abort the interpreter at exit in about half the runs here.
        with pa.OSFile(str(p)) as f:
            return pq.read_table(f, columns=columns, filters=filters)
    except OSError:
        raise
    except Exception as e:  # pyarrow raises several kinds for a damaged file
        raise CorruptResults(f"{p}: cannot read ({type(e).__name__}){'; ' + hint if hint else ''}") from None


CHUNK_HINT = "move that chunk directory away and rerun the same command to train its runs again"


def _renumber(run: np.ndarray, ids: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows to keep (their run_id among ids[0], the run_ids as written, ascending) and their new run_ids."""
    written, current = ids
    i = np.minimum(np.searchsorted(written, run), max(len(written) - 1, 0))
    keep = (written[i] == run) if len(written) else np.zeros(len(run), bool)
    return keep, current[i[keep]]


def read_chunk_table(d: Path, name: str, ids: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame | None:
    """A finished chunk's table (None if it has none), with only the runs in ``ids`` = (run_ids as
    written, ascending; run_ids to give them), renumbered."""
    p = d / f"{name}.parquet"
    if not p.exists():
        return None
    df = read_parquet(p, hint=CHUNK_HINT)
    if ids is None:
        return df
    keep, run_ids = _renumber(df["run_id"].to_numpy(), ids)
    return df[keep].assign(run_id=run_ids).reset_index(drop=True)


def _chunk_arrow(d: Path, name: str, ids, keys: list[str]) -> pa.Table:
    """read_chunk_table as an arrow table, sorted by ``keys`` (stably)."""
    table = _read_arrow(d / f"{name}.parquet", hint=CHUNK_HINT)
    keep, run_ids = _renumber(table["run_id"].to_numpy(), ids)
    table = table.filter(pa.array(keep))
    table = table.set_column(table.schema.get_field_index("run_id"), "run_id", pa.array(run_ids, pa.int64()))
    return _sorted(table, keys)


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    """The table sorted by ``keys``, stably; as it is if it already is (chunk tables are written
    in key order but for curves and estimators), which costs one comparison per key and row."""
    ok = None  # per row: the next row is not below it on the keys so far (last key first)
    for k in reversed(keys):
        a = table[k].to_numpy()
        up, same = a[1:] > a[:-1], a[1:] == a[:-1]
        ok = up | same if ok is None else up | (same & ok)
    if ok is None or ok.all():
        return table
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))


def write_merged(path: Path, parts, keys: list[str], rows_per_group: int = ROWS_PER_GROUP) -> bool:
    """Stream finished chunks' tables into one parquet file sorted by ``keys`` (run_id first),
    holding only the chunks whose runs interleave, not the whole table.

    ``parts``: (chunk directory, (written run_ids, current run_ids)) per chunk. Chunks are read in
    order of their first current run_id; rows below the next chunk's first run_id are final and
    written, in row groups of about ``rows_per_group`` rows. Equal keys occur only within a run,
    so a stable sort (arrow's is) gives what sorting the whole table stably would. Returns False
    (nothing written) if no chunk has the table.
    """
    parts = sorted(((d, ids) for d, ids in parts if len(ids[1])), key=lambda p: int(p[1][1].min()))
    present = [(d, ids) for d, ids in parts if (d / path.name).exists()]
    if not present:
        return False

    def ready_rows():
        held = []  # sorted tables whose rows may still interleave with chunks to come
        for k, (d, ids) in enumerate(present):
            held.append(_chunk_arrow(d, path.stem, ids, keys))
            bound = int(present[k + 1][1][1].min()) if k + 1 < len(present) else None
            ready, keep = [], []
            for h in held:
                cut = len(h) if bound is None else int(np.searchsorted(h["run_id"].to_numpy(), bound))
                ready.append(h.slice(0, cut))
                if cut < len(h):
                    keep.append(h.slice(cut))
            held = keep
            yield _sorted(pa.concat_tables(ready), keys) if len(ready) > 1 else ready[0]

    def write(tmp):
        writer, batch, rows = None, [], 0
        for t in ready_rows():
            batch.append(t)
            rows += len(t)
            if rows >= rows_per_group:
                writer, batch, rows = _write_group(tmp, writer, batch), [], 0
        _write_group(tmp, writer, batch).close()  # the rest; with no rows at all, the schema

    write_atomic(path, write)
    return True


def _write_group(tmp, writer: pq.ParquetWriter | None, batch: list[pa.Table]) -> pq.ParquetWriter:
    """Append the tables in ``batch`` as one row group, opening the file with their schema on first
    use (``parquet_options``)."""
    if writer is not None and not batch:
        return writer
    table = pa.concat_tables(batch).combine_chunks()
    if writer is None:
        floats = {f.name for f in table.schema if pa.types.is_floating(f.type)}
        writer = pq.ParquetWriter(tmp, table.schema, **parquet_options(table.schema.names, floats))
    if len(table):
        writer.write_table(table)
    return writer


def clean_debris(out: Path) -> None:
    """Remove temporary files and locks that dead processes of this host left behind; those of
    live processes, or of other hosts, are left alone."""
    out = Path(out)
    for base in (out, out / "chunks", *out.glob("shards/*"), *out.glob("shards/*/chunks")):
        if base.is_dir():
            for p in [*base.glob(".tmp-*"), *base.glob(".lock-*")]:
                owner = p.name[len(".tmp-") :] if p.name.startswith(".tmp-") else _read(p)
                if owner and dead_local_writer(owner):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


FINAL_FILES = (
    "runs",
    "metrics",
    "density",
    "calibration",
    "curves",
    "estimators",
    "recalibrated",
    "summary",
    "summary_by_setting",
    "estimator_benchmark",
)


FIGURE_RECORD = ".calibjax-figures.json"  # in DIR/figures: the names of the figures calibjax drew there


def record_figures(out: Path, paths) -> None:
    """Note in DIR/figures which of ``paths`` calibjax drew there: ``--overwrite`` removes exactly
    these, never a file because of its name pattern (a user's own PNG stays)."""
    d = Path(out) / "figures"
    if d.is_symlink() or not d.is_dir():
        return
    names, known = {Path(p).name for p in paths if Path(p).parent == d}, set(recorded_figures(d))
    if names - known:
        write_json(d / FIGURE_RECORD, sorted(known | names))


def recorded_figures(d: Path) -> list[str]:
    try:
        names = json.loads((d / FIGURE_RECORD).read_text())
        return [n for n in names if isinstance(n, str) and "/" not in n] if isinstance(names, list) else []
    except (OSError, ValueError):
        return []


def _own_file(p: Path) -> bool:
    """A regular file (not a symlink, which calibjax never writes)."""
    return p.is_file() and not p.is_symlink()


def _own_chunk(d: Path) -> bool:
    """A finished chunk calibjax wrote: a real directory (not a symlink) holding exactly its
    chunk.json and the tables that lists, each a regular file."""
    if d.is_symlink() or not d.is_dir() or not CHUNK_ID.match(d.name):
        return False
    info = chunk_info(d)
    if info is None:
        return False
    expected = {"chunk.json", *(f"{name}.parquet" for name in info["tables"])}
    return {f.name for f in d.iterdir()} == expected and all(_own_file(d / n) for n in expected)


def results_written(out: Path) -> tuple[list[Path], list[Path]]:
    """What calibjax wrote in a results directory and ``--overwrite`` removes: files (final tables,
    recorded figures and their record, report.html, manifests) and finished chunk directories.
    Nothing reached through a symbolic link, nothing of a name calibjax's records do not list."""
    out = Path(out)
    remove, trees = [], []
    shards = out / "shards"
    parts = [out] + (
        [p for p in shards.iterdir() if SHARD_PART.match(p.name) and not p.is_symlink()]
        if shards.is_dir() and not shards.is_symlink()
        else []
    )
    for part in parts:
        chunks = part / "chunks"
        if chunks.is_dir() and not chunks.is_symlink():
            trees += [d for d in chunks.iterdir() if _own_chunk(d)]
        remove.append(part / "manifest.json")
    remove += [out / f"{name}.parquet" for name in FINAL_FILES] + [out / "report.html"]
    figures = out / "figures"
    if figures.is_dir() and not figures.is_symlink():
        remove += [figures / n for n in recorded_figures(figures)] + [figures / FIGURE_RECORD]
    return [p for p in remove if _own_file(p)], sorted(trees)


def remove_results(out: Path) -> None:
    """Delete what calibjax wrote in a results directory (``results_written``: decided in full
    before anything is deleted). Anything else stays; so does a folder left non-empty."""
    out = Path(out)
    remove, trees = results_written(out)
    for d in trees:
        shutil.rmtree(d)
    for p in remove:
        p.unlink(missing_ok=True)
    for part in [*(p for p in out.glob("shards/*") if SHARD_PART.match(p.name) and not p.is_symlink()), out]:
        _rmdir_if_empty(part / "chunks")
        if part != out:
            _rmdir_if_empty(part)
    for d in (out / "shards", out / "figures"):
        _rmdir_if_empty(d)


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
        raise CorruptResults(
            f"{p}: not a readable calibjax manifest ({e}); move the directory away, or use --out to write elsewhere"
        ) from None
    if not isinstance(manifest, dict) or "sweep_sha256" not in manifest:
        raise CorruptResults(
            f"{p}: not a calibjax manifest (no sweep_sha256); move the directory away, or use --out to write elsewhere"
        )
    return manifest
