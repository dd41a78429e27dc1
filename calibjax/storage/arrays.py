"""A results directory as labelled N-dimensional arrays (xarray), and their export to netCDF or zarr.

A grid sweep's natural form is an array: one dimension per grid axis (in the sweep's order, with
the axis's values as coordinates), ``case`` where the sweep has several cases, ``seed``, then the
table's own keys after run_id (``step``; density adds ``log10_density_lo``, calibration
``conf_lo``, curves ``class`` and ``x``, estimators ``estimator``, ``n`` and ``draw``). Each column of
the table is a variable over all of them (NaN where a run is missing or a key does not apply);
the runs table's outcomes (``status``, ``bayes_loss``, ``mutual_info``) are variables over the run
dimensions; every other runs column (run_id, run_hash, group and the settings) is a coordinate over
the run dimensions, or an attribute where it is the same for every run. xarray (and h5netcdf or
zarr for the files) is an optional dependency: ``pip install 'calibjax[export]'``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax.errors import CalibjaxError
from calibjax.storage import files, owned, reader, results, tables

FORMATS = {"netcdf": ".nc", "zarr": ".zarr"}
OUTCOMES = ("status", "bayes_loss", "mutual_info")
ARRAY_TABLES = tuple(name for name in tables.TABLES if name != "status")


class ExportError(CalibjaxError):
    """An export that cannot be made here (a package missing, a table absent)."""


def _xarray():
    try:
        import xarray
    except ImportError:
        raise ExportError("xarray is not installed: pip install 'calibjax[export]'") from None
    return xarray


def _shown(value):
    """An axis value as a coordinate: a list (hidden widths) as "64-64", like the runs table."""
    return "-".join(map(str, value)) if isinstance(value, list | tuple) else value


def run_index(manifest: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run_id, its position in the grid of the sweep ``manifest`` records: ``case`` (when the
    sweep has several), one column per grid axis (named by its key, holding the axis's value) and
    ``seed``."""
    sw = results.manifest_sweep(manifest)
    run_id = runs["run_id"].to_numpy(np.int64)
    point, seed = np.divmod(run_id, len(sw.seeds))
    case, digits = sw.digits(point)
    index = {"run_id": run_id}
    if len(sw.cases) > 1:
        index["case"] = runs["case"].to_numpy()
    for a, axis in enumerate(sw.axes):
        values = [_shown(v) for v in axis.values]
        index[axis.key] = np.asarray(values, dtype=object if isinstance(values[0], str) else None)[digits[a]]
    index["seed"] = np.asarray(sw.seeds, np.int64)[seed]
    return pd.DataFrame(index)


def to_xarray(out: str | Path, table: str = "metrics"):
    """One final table of a results directory as an ``xarray.Dataset`` (see the module's doc)."""
    xr = _xarray()
    out = Path(out)
    if table not in ARRAY_TABLES:
        raise ExportError(f"{table!r}: not a table of runs; one of {', '.join(ARRAY_TABLES)}")
    for name in ("runs", table):
        if not (out / f"{name}.parquet").is_file():
            raise ExportError(
                f"{out}: no {name}.parquet here (a table the sweep did not make, or not run or merged yet)"
            )
    runs, rows = reader.read_table(out, "runs"), reader.read_table(out, table)
    manifest = files.read_manifest(out)
    where = run_index(manifest, runs)
    dims = [c for c in where.columns if c != "run_id"]
    keys = [k for k in tables.TABLES[table].keys if k != "run_id"] + (["x2"] if "x2" in rows.columns else [])
    rows = rows.merge(where, on="run_id", how="inner").drop(columns="run_id")
    ds = xr.Dataset.from_dataframe(rows.set_index(dims + keys))
    per_run = runs.drop(columns=[c for c in dims if c in runs.columns]).merge(where, on="run_id").set_index(dims)
    settings = [c for c in runs.columns if c not in (*OUTCOMES, *dims)]
    varying = [c for c in settings if per_run[c].nunique(dropna=False) > 1 or c == "run_id"]
    runs_ds = xr.Dataset.from_dataframe(per_run[[*OUTCOMES, *varying]])
    ds = ds.assign({c: runs_ds[c] for c in OUTCOMES}).assign_coords({c: runs_ds[c] for c in varying})
    constant = {c: per_run[c].iloc[0] for c in settings if c not in varying}
    ds.attrs.update({k: v.item() if hasattr(v, "item") else v for k, v in constant.items()})
    ds.attrs.update(
        table=table,
        sweep_name=manifest["sweep_name"],
        sweep_text=manifest["sweep_text"],
        numbers_version=int(manifest.get("numbers_version") or 0),
        calibjax=str(manifest.get("versions", {}).get("calibjax", "")),
    )
    return ds


def export(out: str | Path, fmt: str, names=None, target: str | Path | None = None) -> list[Path]:
    """Write each table (default: every table of runs present) as ``<target>/<table>.nc`` or
    ``.zarr`` (target: DIR/export), each written under a temporary name and renamed, and recorded
    in ``<target>/.calibjax-exports.json``: a file of that name that calibjax did not write is
    refused, never replaced, and ``--overwrite`` removes exactly the recorded ones."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    _require("h5netcdf" if fmt == "netcdf" else "zarr")
    reader.require_results(out)
    names = list(names) if names else [n for n in ARRAY_TABLES if (out / f"{n}.parquet").exists()]
    target = Path(target) if target else out / "export"
    paths = {name: target / f"{name}{FORMATS[fmt]}" for name in names}
    ours = owned.recorded(target, owned.EXPORT_RECORD)
    for path in paths.values():
        if (path.exists() or path.is_symlink()) and (path.name not in ours or path.is_symlink()):
            raise ExportError(f"{path}: exists and calibjax did not write it; choose another --output")
    datasets = {name: to_xarray(out, name) for name in names}  # (every table read and checked first)
    target.mkdir(parents=True, exist_ok=True)
    for name, ds in datasets.items():
        path = paths[name]
        staging = Path(tempfile.mkdtemp(prefix=files._tmp_prefix(), dir=target))
        try:
            tmp = staging / path.name
            if fmt == "netcdf":
                ds.to_netcdf(tmp, engine="h5netcdf")
            else:  # (xarray.open_zarr(path, consolidated=False) reads it)
                ds.to_zarr(tmp, mode="w", consolidated=False)
            if path.is_dir():
                shutil.rmtree(path)  # (our own zarr store, by the record)
            tmp.replace(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        owned.record(target, owned.EXPORT_RECORD, [path], reader.generation(out))
    return list(paths.values())


def _require(package: str) -> None:
    for name in (package, "h5py") if package == "h5netcdf" else (package,):
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"{name} is not installed: pip install 'calibjax[export]'") from None
