"""Files on disk: atomic writes, parquet tables, manifests, debris of dead writers.

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

Every file is written to a temporary name and renamed (``write_atomic``); the final tables
are written as one set (``Staged``), each naming in its footer the write it belongs to
(``GENERATION``, recorded in manifest.json), so a reader never takes a mix of two. Chunk
directories are ``calibjax.storage.chunks``; what ``--overwrite`` may remove,
``calibjax.storage.owned``. Temporary names and lock files (``chunks/.lock-<id>``, one per
chunk being trained) carry their writer's host and pid: only debris of dead writers of this
host is removed, so processes sharing a directory cooperate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from calibjax.errors import CalibjaxError

HOST = socket.gethostname()
CHUNK_ID = re.compile(r"^g\d{3}-r\d{7}-n\d+-[0-9a-f]{8}$")  # planning.Chunk.chunk_id
SHARD_PART = re.compile(r"^\d+-of-\d+$")
# In a results directory: the finished runs' tables, summaries, figures and report while the sweep
# is unfinished (pipeline.report), kept apart from the directory's own; removed when it finishes.
PARTIAL = "partial"
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


def write_atomic(path: Path, write, staged: Staged | None = None) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path to path (same directory, so atomic); with
    ``staged``, leave the rename to ``staged.commit()``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        if staged is None:
            os.replace(tmp, path)
        else:
            staged.pending.append((Path(tmp), path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Staged:
    """Files written in full to temporary names, then switched into place one rename each
    (``commit``): a full disk or an error while writing any of them leaves every file as it was.
    Leaving the ``with`` block without committing removes the temporary files."""

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []
        self.removed: list[Path] = []  # files that are no longer part of the set, unlinked on commit

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)

    def commit(self) -> None:
        for tmp, path in self.pending:
            os.replace(tmp, path)
        self.pending = []
        for path in self.removed:
            path.unlink(missing_ok=True)


# A final table's footer names the write of the final tables it belongs to (manifest.json's
# "generation", a digest of their content: ``results.content_generation``): readers refuse a table of
# another (``reader.read_table``), so an interrupted rewrite is never read as a mix of two.
GENERATION = b"calibjax.generation"


def parquet_options(columns: list[str], floats: set[str]) -> dict:
    """Dictionary encoding and row-group statistics (what filters skip row groups by) for all but
    the float columns: a float column of results has nearly as many values as rows, and encoding it
    by dictionary made writing slower and larger (docs/performance.md, "Planning constants")."""
    keyed = [c for c in columns if c not in floats]
    return {"use_dictionary": keyed, "write_statistics": keyed}


def to_parquet(df: pd.DataFrame, path, generation: str | None = None) -> None:
    """A DataFrame as a parquet file (``parquet_options``), its footer naming ``generation`` if given."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    floats = {f.name for f in table.schema if pa.types.is_floating(f.type)}
    pq.write_table(
        stamped(table, generation), path, **parquet_options(table.schema.names, floats), compression="snappy"
    )


def stamped(table: pa.Table, generation: str | None) -> pa.Table:
    if generation is None:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), GENERATION: generation.encode()})


ROWS_PER_GROUP = 1 << 18  # rows per parquet row group of a large table (what a filter skips by)


def write_parquet(
    path: Path,
    df: pd.DataFrame,
    rows_per_group: int = ROWS_PER_GROUP,
    generation: str | None = None,
    staged: Staged | None = None,
) -> None:
    """A table, atomically (``write_atomic``); a large one in row groups converted one at a time
    (arrow's copy of a million-row summary would otherwise double its memory)."""
    if len(df) <= rows_per_group:
        write_atomic(path, lambda tmp: to_parquet(df, tmp, generation), staged)
        return

    def write(tmp):
        writer = None
        for start in range(0, len(df), rows_per_group):
            part = pa.Table.from_pandas(
                df.iloc[start : start + rows_per_group], preserve_index=False, schema=writer.schema if writer else None
            )
            writer = _write_group(tmp, writer, [stamped(part, generation)])
        writer.close()

    write_atomic(path, write, staged)


def write_json(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def read_parquet(p: Path, columns=None, filters=None, hint: str = "") -> pd.DataFrame:
    """One table, read through a single open file (a concurrent atomic replace cannot mix two
    versions); only ``columns`` and the rows that pass ``filters`` (pyarrow's form) are built. A
    damaged file is a CorruptResults naming it (and ``hint``, the way out)."""
    return frame(read_arrow(p, columns, filters, hint))


def frame(table: pa.Table) -> pd.DataFrame:
    """An arrow table as a DataFrame; arrow's buffers are freed column by column as pandas takes
    them, so a large table is not held twice."""
    return table.to_pandas(split_blocks=True, self_destruct=True)


def read_arrow(p: Path, columns=None, filters=None, hint: str = "") -> pa.Table:
    """``read_parquet``'s table, as arrow."""
    return _parquet(p, lambda f: pq.read_table(f, columns=columns, filters=filters), hint)


def read_schema(p: Path, hint: str = "") -> pa.Schema:
    """A parquet file's schema, with its metadata, from its footer (no rows read)."""
    return _parquet(p, pq.read_schema, hint)


def _parquet(p: Path, read, hint: str):
    try:
        # Arrow's own file (one descriptor, like a Python file): reading through a Python file object
        # let pyarrow's I/O threads abort the interpreter at exit in about half the runs here.
        with pa.OSFile(str(p)) as f:
            return read(f)
    except OSError:
        raise
    except Exception as e:  # pyarrow raises several kinds for a damaged file
        raise CorruptResults(f"{p}: cannot read ({type(e).__name__}){'; ' + hint if hint else ''}") from None


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
    "density_times",
    "density_law",
)


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
