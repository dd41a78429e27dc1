"""Files on disk: atomic writes, finished chunks, reading them back.

Layout of a results directory (the tables' columns are in ``calibjax.tables``)::

    manifest.json          sweep text and hash, plot settings, versions, devices, timings
    runs.parquet           one row per run (settings, status, bayes_loss)
    metrics.parquet        run x checkpoint           density.parquet    ... x log10-density bin
    calibration.parquet    ... x confidence bin       curves.parquet     ... x point x class
    summary.parquet, summary_by_setting.parquet
    chunks/<id>/*.parquet  the same tables for each finished chunk (what resume reads)
    shards/K-of-N/         a shard's manifest and chunks
    figures/*.png

A chunk is written into a temporary directory and renamed into place, so it
exists completely or not at all; every other file is written to a temporary
name and renamed. A killed run leaves only ``.tmp-*`` debris, which is ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path to path (same directory, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
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


def write_chunk(out: Path, chunk_id: str, tables: dict[str, pd.DataFrame]) -> None:
    """Write one finished chunk's tables as a unit: temp directory, then rename."""
    chunks = out / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=chunks))
    try:
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        os.replace(tmp, chunks / chunk_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def chunk_dirs(out: Path) -> list[Path]:
    """Finished chunks of a results directory: its own and those of its shard parts."""
    out = Path(out)
    dirs = [*out.glob("chunks/*"), *out.glob("shards/*/chunks/*")]
    return sorted((p for p in dirs if p.is_dir() and not p.name.startswith(".tmp-")),
                  key=lambda p: (p.name, str(p)))


def _owners(out: Path) -> dict[Path, list[int]]:
    """run_ids each chunk owns; a run finished twice (say, by two shard layouts) counts once."""
    owners, seen = {}, set()
    for d in chunk_dirs(out):
        ids = [i for i in pd.read_parquet(d / "status.parquet", columns=["run_id"])["run_id"] if i not in seen]
        seen.update(ids)
        owners[d] = ids
    return owners


def finished_run_ids(out: Path) -> set[int]:
    return {i for ids in _owners(out).values() for i in ids}


def read_chunk_tables(out: Path, names) -> dict[str, pd.DataFrame | None]:
    """Each named table joined over all finished chunks, each run once, in chunk order; None if
    no chunk has it."""
    owners = _owners(out)  # read once for all tables
    tables = {}
    for name in names:
        parts = []
        for d, ids in owners.items():
            p = d / f"{name}.parquet"
            if ids and p.exists():
                df = pd.read_parquet(p)
                parts.append(df[df["run_id"].isin(ids)])
        parts = [p for p in parts if len(p)]
        tables[name] = pd.concat(parts, ignore_index=True) if parts else None
    return tables


def clean_debris(out: Path) -> None:
    """Remove temporary files and directories a killed run left behind."""
    for base in (Path(out), Path(out) / "chunks", *Path(out).glob("shards/*"), *Path(out).glob("shards/*/chunks")):
        if base.exists():
            for p in base.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def remove_results(out: Path) -> None:
    """Delete a results directory's tables, chunks, shard parts, figures and manifest."""
    out = Path(out)
    for name in ("chunks", "shards", "figures"):
        shutil.rmtree(out / name, ignore_errors=True)
    for p in out.glob("*.parquet"):
        p.unlink()
    (out / "manifest.json").unlink(missing_ok=True)


def read_manifest(out: Path) -> dict | None:
    p = Path(out) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else None


def load_results(out: str | Path) -> dict[str, pd.DataFrame]:
    """The final tables of a results directory, by name (runs, metrics, density, calibration, curves,
    summary, summary_by_setting)."""
    out = Path(out)
    return {p.stem: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}
