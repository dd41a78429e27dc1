"""Reading a results directory's final tables: ``load_results``, ``read_table`` and ``Results``.

The file mechanics (atomic writes, chunks, locks) are ``calibjax.storage.files``; the tables'
columns are ``calibjax.storage.tables``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa

from calibjax.storage.files import (
    FINAL_FILES,
    GENERATION,
    CorruptResults,
    frame,
    read_arrow,
    read_manifest,
    read_schema,
)


def require_results(out: str | Path) -> Path:
    """``out`` as a Path, if it holds a sweep's final runs and metrics tables (else CorruptResults
    saying so: summaries and figures are drawn from them)."""
    out = Path(out)
    if not (out / "runs.parquet").exists() or not (out / "metrics.parquet").exists():
        raise CorruptResults(f"{out}: no runs.parquet and metrics.parquet here; run or merge a sweep first")
    return out


def load_results(out: str | Path, names=FINAL_FILES) -> dict[str, pd.DataFrame]:
    """The final tables of a results directory, by name (runs, metrics, density, calibration, curves,
    estimators, recalibrated, summary, summary_by_setting, estimator_benchmark): those present
    among ``names``. For a large sweep, ``read_table`` reads only the columns and rows asked for.

    Only calibjax's own table names are read, never another writer's temporary file (``.tmp-*``,
    still being written while processes share the directory) or a file of the user's.
    """
    found = {}
    for name in names:
        try:
            found[name] = read_table(out, name)
        except FileNotFoundError:
            continue
    return found


def generation(out: str | Path) -> str | None:
    """The write of the final tables that manifest.json records (None before 0.11.0, or none yet)."""
    return (read_manifest(Path(out)) or {}).get("generation")


def _check_generation(out: Path, name: str, schema: pa.Schema, expected: str | None) -> None:
    """Refuse a final table that another write of the final tables left (an interrupted finalize,
    merge or summarize) than ``expected`` (``generation``): the tables are read as one set or not
    at all."""
    theirs = (schema.metadata or {}).get(GENERATION, b"").decode()
    if expected is not None and theirs != expected:
        again = f"calibjax summarize {out}" if name in SUMMARY_TABLES else f"calibjax merge {out}"
        raise CorruptResults(
            f"{out / f'{name}.parquet'}: left by another write of the final tables than manifest.json "
            f"records (that write was interrupted), so it may not match the others; {again} writes them again"
        )


SUMMARY_TABLES = ("summary", "summary_by_setting", "estimator_benchmark", "density_times", "density_law")


def table_problems(out: str | Path) -> list[str]:
    """What keeps the final tables present from being read as one set: one line per table that is
    damaged or of another write (``_check_generation``); footers only, no rows read."""
    problems, expected = [], generation(out)
    for name in FINAL_FILES:
        if (Path(out) / f"{name}.parquet").exists():
            try:
                _check_generation(Path(out), name, read_schema(Path(out) / f"{name}.parquet", _hint(out)), expected)
            except CorruptResults as e:
                problems.append(str(e))
    return problems


def _hint(out: Path) -> str:
    return f"rerun the sweep's command (or calibjax merge {out}) to write it again"


def read_table(out: str | Path, name: str, columns=None, filters=None) -> pd.DataFrame:
    """One final table of a results directory: only ``columns`` (default all), only the rows that
    pass ``filters``, in pyarrow's form, e.g. ``[("step", "==", 1000)]`` or
    ``[("run_id", "in", ids)]`` (row groups whose statistics rule them out are not read).
    FileNotFoundError if the directory has no such table; CorruptResults if it is damaged or of
    another write of the final tables than the rest (``_check_generation``)."""
    if name not in FINAL_FILES:
        raise ValueError(f"{name!r}: not a calibjax table; tables are {', '.join(FINAL_FILES)}")
    out = Path(out)
    table = read_arrow(out / f"{name}.parquet", columns, filters, hint=_hint(out))
    _check_generation(out, name, table.schema, generation(out))
    return frame(table)


def table_columns(out: str | Path, name: str) -> list[str]:
    """The columns of a final table, read from its footer (no rows read)."""
    out = Path(out)
    schema = read_schema(out / f"{name}.parquet", _hint(out))
    _check_generation(out, name, schema, generation(out))
    return schema.names


class Results(Mapping):
    """A results directory's final tables by name, each read when first asked for (figures of a
    large sweep then read only the tables they draw)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self._read: dict[str, pd.DataFrame] = {}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._read:
            if name not in FINAL_FILES:
                raise KeyError(name)
            try:
                self._read[name] = read_table(self.out, name)
            except FileNotFoundError:  # a damaged table is a CorruptResults, not a missing one
                raise KeyError(name) from None
        return self._read[name]

    def __setitem__(self, name: str, df: pd.DataFrame) -> None:
        self._read[name] = df

    def __contains__(self, name) -> bool:
        return name in self._read or (name in FINAL_FILES and (self.out / f"{name}.parquet").is_file())

    def __iter__(self):
        return (n for n in FINAL_FILES if n in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_xarray(self, table: str = "metrics"):
        """One table as an ``xarray.Dataset`` over the grid axes, seed and the table's keys
        (``calibjax.storage.arrays``; needs ``pip install 'calibjax[export]'``)."""
        from calibjax.storage import arrays

        return arrays.to_xarray(self.out, table)


def load(out: str | Path) -> Results:
    """A results directory's final tables (``Results``: each read when first asked for, and
    ``.to_xarray()``); CorruptResults if it holds no runs and metrics tables."""
    return Results(require_results(out))
