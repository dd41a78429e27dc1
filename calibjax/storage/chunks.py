"""Chunk directories: a chunk's tables written as a unit, verified before they are joined, locks.

A chunk is written into a temporary directory and renamed into place; it counts as finished only
when its ``chunk.json`` (written last) checks out (``check_chunk``): it records, for every table,
its size, row count and SHA-256, the run_ids and identities (``sweep.Sweep.hashes``) of its runs,
the numbers identity that computed them (``results.numbers_identity``) and a digest of all that.
A chunk that fails (a table missing, changed or replaced, chunk.json edited, computed with other
numbers) is never joined: its runs count as unfinished, and ``calibjax run`` moves it aside to
``chunks/.broken-<id>-<writer>`` (kept, never deleted) and trains them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from calibjax.storage.files import (
    CHUNK_ID,
    HEARTBEAT_S,
    LOCK_STALE_S,
    ROWS_PER_GROUP,
    Staged,
    _tmp_prefix,
    _umask,
    _write_group,
    _writer,
    dead_local_writer,
    read_arrow,
    read_parquet,
    stamped,
    to_parquet,
    write_atomic,
)

FORMAT = 2  # chunk.json with files, identity and digest (0.11.0); format 1 (no "format" key) had none

_hashes: dict[tuple, str] = {}  # (device, inode, size, mtime) -> SHA-256: a file is hashed once per process


def file_sha256(p: Path) -> str:
    """The SHA-256 of a file's bytes (remembered while the file is unchanged)."""
    st = p.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # (kept by a rename)
    if key not in _hashes:
        with open(p, "rb") as f:
            _hashes[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _hashes[key]


def content_tag(run_hashes) -> str:
    """What a chunk's name ends with: a hash of its runs' identities (``planning.Chunk.chunk_id``)."""
    return hashlib.sha256(" ".join(run_hashes).encode()).hexdigest()[:8]


def _digest(info: dict) -> str:
    """A chunk.json's digest: the SHA-256 of everything else in it, in canonical form."""
    body = {k: v for k, v in info.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def info_digest(d: Path) -> str:
    """The digest of a chunk's chunk.json (``_digest``; a chunk of format 1 records none)."""
    info = read_info(d)
    return _digest(info) if info is not None else ""


def read_info(d: Path) -> dict | None:
    """A chunk directory's chunk.json as written (None if it has none or it is not JSON)."""
    try:
        info = json.loads((d / "chunk.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def check_chunk(d: Path, identity: dict | None = None) -> tuple[dict | None, str | None]:
    """(chunk.json, None) for a finished chunk whose tables are those it records and whose numbers
    identity is ``identity`` (not checked when None); else (None, why not). Reads every table's
    bytes once per process. A chunk written before 0.11.0 (format 1) records no content: only its
    tables' presence is checked, and the directory's manifest vouches for its numbers."""
    info = read_info(d)
    if info is None:
        return None, "no readable chunk.json"
    try:
        names, run_ids, run_hashes = list(info["tables"]), list(info["run_ids"]), list(info["run_hashes"])
        if len(run_ids) != len(run_hashes) or not names:
            return None, "chunk.json lists run_ids and run identities that do not pair up"
        missing = [n for n in names if not (d / f"{n}.parquet").is_file()]
        if missing:
            return None, f"{missing[0]}.parquet is missing"
        if info.get("format", 1) < FORMAT:
            return info, None
        if info.get("digest") != _digest(info):
            return None, "chunk.json was changed after it was written (its digest does not match)"
        if not d.name.endswith(f"-n{len(run_hashes)}-{content_tag(run_hashes)}"):
            return None, "holds other runs than its name says (another sweep's chunk, or renamed)"
        for name in names:
            p, rec = d / f"{name}.parquet", info["files"][name]
            if p.stat().st_size != rec["bytes"] or file_sha256(p) != rec["sha256"]:
                return None, f"{name}.parquet is not the table written there (its size or SHA-256 differs)"
    except (KeyError, TypeError, ValueError, OSError) as e:
        return None, f"chunk.json is damaged ({type(e).__name__}: {e})"
    if identity is not None and info["identity"] != identity:
        theirs = {k: v for k, v in info["identity"].items() if identity.get(k) != v}
        return None, f"computed with other numbers ({', '.join(f'{k} {v!r}' for k, v in theirs.items())})"
    return info, None


def chunk_complete(d: Path, identity: dict | None = None) -> bool:
    return check_chunk(d, identity)[0] is not None


def write_chunk_tables(
    out: Path, chunk_id: str, tables: dict[str, pd.DataFrame], run_ids, run_hashes, identity: dict
) -> bool:
    """Write one finished chunk's tables as a unit: temp directory, then rename.

    Returns False (and writes nothing) if another process finished the same chunk first (a
    chunk of that name that checks out, with the same runs). Any other directory of that name
    (unfinished, damaged, of other runs or other numbers) is moved aside to
    ``chunks/.broken-<id>-<writer>``, kept for inspection, not deleted.
    """
    chunks = out / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=chunks))
    try:
        recorded = {}
        for name, df in tables.items():
            p = tmp / f"{name}.parquet"
            to_parquet(df, p)
            recorded[name] = {"rows": len(df), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
        info = {
            "format": FORMAT,
            "tables": sorted(tables),
            "files": recorded,
            "run_ids": [int(i) for i in run_ids],
            "run_hashes": list(run_hashes),
            "identity": identity,
            "writer": _writer(),
        }
        (tmp / "chunk.json").write_text(json.dumps({**info, "digest": _digest(info)}) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        target = chunks / chunk_id
        if target.exists():
            theirs = check_chunk(target, identity)[0]
            if theirs is not None and theirs["run_hashes"] == info["run_hashes"]:
                shutil.rmtree(tmp)
                return False
            set_aside(target)
        os.replace(tmp, target)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_aside(d: Path) -> Path:
    """Move a chunk directory that must not be joined out of the way (kept, not deleted)."""
    target = d.parent / f".broken-{d.name}-{_writer()}-{time.time_ns()}"
    d.rename(target)
    return target


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


def finished_chunks(
    out: Path, identity: dict | None = None, rejected: list | None = None
) -> dict[Path, dict[int, str]]:
    """Per finished chunk that checks out (its own and its shard parts'; ``check_chunk``), the
    runs it owns (the run_id it was written with -> the run's hash); a run finished twice (say,
    by two shard layouts) counts once. Chunks that fail are appended to ``rejected`` as
    (directory, why)."""
    out = Path(out)
    dirs = sorted(
        (p for p in [*out.glob("chunks/*"), *out.glob("shards/*/chunks/*")] if p.is_dir() and CHUNK_ID.match(p.name)),
        key=lambda p: (p.name, str(p)),
    )
    owners, seen = {}, set()
    for d in dirs:
        info, why = check_chunk(d, identity)
        if info is None:
            if rejected is not None:
                rejected.append((d, why))
            continue
        owned = {int(i): h for i, h in zip(info["run_ids"], info["run_hashes"], strict=True) if h not in seen}
        seen.update(owned.values())
        owners[d] = owned
    return owners


def first_identity(out: Path) -> dict | None:
    """The numbers identity the first chunk of a results directory records (None: no chunk
    records one), for a directory whose manifests record none yet."""
    for d in sorted([*Path(out).glob("chunks/*"), *Path(out).glob("shards/*/chunks/*")], key=lambda p: p.name):
        info = read_info(d) if CHUNK_ID.match(d.name) else None
        if info is not None and isinstance(info.get("identity"), dict):
            return info["identity"]
    return None


def finished_hashes(out: Path, identity: dict | None = None, rejected: list | None = None) -> set[str]:
    """Identities (sweep.Sweep.hashes) of the runs finished in a results directory."""
    return {h for owned in finished_chunks(out, identity, rejected).values() for h in owned.values()}


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
    table = read_arrow(d / f"{name}.parquet", hint=CHUNK_HINT)
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


def write_merged(
    path: Path,
    parts,
    keys: list[str],
    rows_per_group: int = ROWS_PER_GROUP,
    generation: str | None = None,
    staged: Staged | None = None,
) -> bool:
    """Stream finished chunks' tables into one parquet file sorted by ``keys`` (run_id first),
    holding only the chunks whose runs interleave, not the whole table.

    ``parts``: (chunk directory, (written run_ids, current run_ids)) per chunk. Chunks are read in
    order of their first current run_id; rows below the next chunk's first run_id are final and
    written, in row groups of about ``rows_per_group`` rows. Equal keys occur only within a run,
    so a stable sort (arrow's is) gives what sorting the whole table stably would. Returns False
    (nothing written) if no chunk has the table. ``generation`` and ``staged``: as for
    ``files.write_parquet``.
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
            rows = _sorted(pa.concat_tables(ready), keys) if len(ready) > 1 else ready[0]
            yield stamped(rows, generation)

    def write(tmp):
        writer, batch, rows = None, [], 0
        for t in ready_rows():
            batch.append(t)
            rows += len(t)
            if rows >= rows_per_group:
                writer, batch, rows = _write_group(tmp, writer, batch), [], 0
        _write_group(tmp, writer, batch).close()  # the rest; with no rows at all, the schema

    write_atomic(path, write, staged)
    return True
