"""A results directory as TensorBoard runs: every metric against step, the settings as hyper-parameters.

``calibjax export DIR --tensorboard LOGDIR`` writes, under ``LOGDIR/<sweep name>``, one TensorBoard
run per finished calibjax run (``--by run``) or per grid point with each metric's median over its
finished seeds (``--by setting``; the default above ``RUNS_PER_FILE_LIMIT`` runs, where TensorBoard itself grows
slow). Each run's event file holds every metric of metrics.parquet as a scalar series against the
training step, and its settings (the sweep's grid axes and case, the seed, and every setting that
varies across the sweep) as the HParams plugin's session; the sweep's folder holds the experiment
(hyper-parameters and metrics) so the HParams dashboard lists them. The event files are written
with TensorBoard's own protocol buffers and record writer (the ``tensorboard`` package, without
TensorFlow: ``pip install 'calibjax[tensorboard]'``); ``tests/test_export.py`` reads them back
with TensorBoard's reader.

Each run folder is written under a temporary name, then renamed into place, and recorded in
``LOGDIR/<sweep name>/.calibjax-exports.json``: a folder of that name calibjax did not write is
refused, never replaced; a new export replaces exactly the recorded ones (and removes recorded
runs the new export no longer has, e.g. after switching ``--by``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from calibjax.storage import files, owned, reader
from calibjax.storage.arrays import ExportError, run_index

RUNS_PER_FILE_LIMIT = 1000  # above this many runs, --by defaults to "setting"
BY = ("run", "setting")


def _tensorboard() -> SimpleNamespace:
    """TensorBoard's protocol buffers, HParams metadata and event writer (no TensorFlow needed)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ExportError("tensorboard is not installed: pip install 'calibjax[tensorboard]'") from None
    return SimpleNamespace(
        event=event_pb2, summary=summary_pb2, api=api_pb2, meta=metadata, plugin=plugin_data_pb2, Writer=EventFileWriter
    )


def export_tensorboard(out: str | Path, logdir: str | Path, by: str | None = None) -> list[Path]:
    """Write the runs of the results directory ``out`` as TensorBoard runs under
    ``logdir/<sweep name>`` (see the module's doc); returns the run folders written."""
    out = Path(out)
    tb = _tensorboard()
    if by is not None and by not in BY:
        raise ExportError(f"--by: expected one of {', '.join(BY)}, got {by!r}")
    reader.require_results(out)
    if not (out / "metrics.parquet").is_file():
        raise ExportError(f"{out}: no metrics.parquet here (not run or merged yet)")
    manifest = files.read_manifest(out)
    runs, metrics = reader.read_table(out, "runs"), reader.read_table(out, "metrics")
    groups = _groups(manifest, runs, metrics, by or ("run" if len(runs) <= RUNS_PER_FILE_LIMIT else "setting"))
    if not groups:
        raise ExportError(f"{out}: no run has finished yet; nothing to export")
    values = [c for c in metrics.columns if c not in ("run_id", "step") and pd.api.types.is_float_dtype(metrics[c])]
    base = Path(logdir) / _clean(manifest["sweep_name"])
    ours = owned.recorded(base, owned.EXPORT_RECORD)
    for name in groups:
        path = base / name
        if (path.exists() or path.is_symlink()) and (name not in ours or path.is_symlink()):
            raise ExportError(f"{path}: exists and calibjax did not write it; choose another LOGDIR")
    metrics = metrics.set_index("run_id")
    base.mkdir(parents=True, exist_ok=True)
    wall = time.time()
    for name, (ids, hparams) in groups.items():
        rows = metrics.loc[ids].reset_index()
        series = rows.groupby("step", sort=True)[values].median() if len(ids) > 1 else rows.set_index("step")[values]
        events = [_plugin_event(tb, tb.meta.SESSION_START_INFO_TAG, _session(tb, hparams, wall), wall)]
        for step, row in series.iterrows():
            # (NaN stays NaN: a diverged run's metrics, recorded as such)
            summary = tb.summary.Summary(
                value=[tb.summary.Summary.Value(tag=f"metrics/{v}", simple_value=float(row[v])) for v in values]
            )
            events.append(tb.event.Event(wall_time=wall, step=int(step), summary=summary))
        _write_events(tb, base, base / name, events)
    first = next(iter(groups.values()))[1]
    experiment = tb.api.Experiment(
        time_created_secs=wall,
        hparam_infos=[tb.api.HParamInfo(name=k, type=tb.api.DataType.Value(_KINDS[type(v)])) for k, v in first.items()],
        metric_infos=[tb.api.MetricInfo(name=tb.api.MetricName(tag=f"metrics/{v}")) for v in values],
    )
    data = tb.plugin.HParamsPluginData(experiment=experiment)
    experiment_file = _write_events(tb, base, None, [_plugin_event(tb, tb.meta.EXPERIMENT_TAG, data, wall)], ours)
    made = [*groups, experiment_file.name]
    for stale in set(ours) - set(made):  # what an earlier export wrote that this one does not (e.g. --by run)
        path = base / stale
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_file() and not path.is_symlink():
            path.unlink()
    owned.record(base, owned.EXPORT_RECORD, [base / n for n in made], reader.generation(out), replace=True)
    return [base / name for name in groups]


_KINDS = {bool: "DATA_TYPE_BOOL", float: "DATA_TYPE_FLOAT64", str: "DATA_TYPE_STRING"}


def _groups(manifest: dict, runs: pd.DataFrame, metrics: pd.DataFrame, by: str) -> dict[str, tuple[list, dict]]:
    """TensorBoard run name -> (its calibjax runs, its hyper-parameters): one per finished run, or
    one per grid point over its finished seeds."""
    where = run_index(manifest, runs)
    where = where[where["run_id"].isin(metrics["run_id"].unique())]  # (a missing run has no metrics)
    axes = [c for c in where.columns if c not in ("run_id", "seed")]
    settings = _varying_settings(runs, where)
    columns = [*axes, "seed"] if by == "run" else axes
    groups = {}
    for ids in _runs_by(where, columns):
        first = where.loc[where["run_id"] == ids[0]].iloc[0]
        hparams = _hparams(runs, first, columns, settings) | ({} if by == "run" else {"seeds": float(len(ids))})
        name = _name(first, columns, "all")
        if name in groups:  # (two values that print alike: the first run's id tells them apart)
            name = f"{name},run{first['run_id']}"
        groups[name] = (ids, hparams)
    return groups


def _runs_by(where: pd.DataFrame, columns: list[str]):
    """The run_ids of each combination of ``columns`` (in the order of the runs)."""
    if not columns:
        yield where["run_id"].tolist()
        return
    for _, ids in where.groupby(columns, sort=False, dropna=False)["run_id"]:
        yield ids.tolist()


def _write_events(tb, base: Path, path: Path | None, events: list, ours: dict | None = None) -> Path:
    """An event file of ``events`` written under a temporary name in ``base``, then renamed into
    place: as the run folder ``path``, or (None) as a file of ``base`` itself, replacing the event
    files there that ``ours`` records. Returns what was put in place."""
    staging = Path(tempfile.mkdtemp(prefix=files._tmp_prefix(), dir=base))
    try:
        writer = tb.Writer(str(staging))
        for event in events:
            writer.add_event(event)
        writer.close()
        if path is None:
            for old in base.glob("events.out.tfevents.*"):
                if old.name in (ours or {}) and not old.is_symlink():
                    old.unlink()
            (made,) = staging.glob("events.out.tfevents.*")
            return made.replace(base / made.name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # (our own run folder, by the record)
        return staging.replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _clean(text: str) -> str:
    """A folder name from a label: letters, digits and ._=,+- kept, anything else as '_'."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(text)) or "_"


def _name(row, columns: list[str], default: str) -> str:
    """A TensorBoard run's folder: key=value of each grid axis (and seed), in the sweep's order."""
    parts = [str(row[c]) if c == "case" else f"{c}={_shown(row[c])}" for c in columns]
    return _clean(",".join(parts)) if parts else default


def _shown(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return str(value)


def _varying_settings(runs: pd.DataFrame, where: pd.DataFrame) -> list[str]:
    """Settings columns of the runs table whose value differs between runs (besides the axes)."""
    skip = {"run_id", "run_hash", "group", "status", "bayes_loss", "mutual_info", *where.columns}
    return [c for c in runs.columns if c not in skip and runs[c].nunique(dropna=False) > 1]


def _hparams(runs: pd.DataFrame, first: pd.Series, columns: list[str], settings: list[str]) -> dict:
    """A TensorBoard run's hyper-parameters: its grid position and the varying settings of its
    first run (those of a grid point's runs differ only in the seed)."""
    hp = {c: _value(first[c]) for c in columns}
    row = runs.loc[runs["run_id"] == first["run_id"]].iloc[0]
    return hp | {c: _value(row[c]) for c in settings if c not in hp}


def _value(v):
    """An hparam value: a number (float64), a bool or a string."""
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | float | np.integer | np.floating):
        return float(v)
    return str(v)


def _session(tb, hparams: dict, wall: float):
    info = tb.plugin.SessionStartInfo(start_time_secs=wall)
    for k, v in hparams.items():
        field = {bool: "bool_value", float: "number_value", str: "string_value"}[type(v)]
        setattr(info.hparams[k], field, v)
    return tb.plugin.HParamsPluginData(session_start_info=info)


def _plugin_event(tb, tag: str, data, wall: float):
    """An event holding HParams plugin data (a session or the experiment) under ``tag``."""
    value = tb.summary.Summary.Value(tag=tag, metadata=tb.meta.create_summary_metadata(data))
    return tb.event.Event(wall_time=wall, step=0, summary=tb.summary.Summary(value=[value]))
