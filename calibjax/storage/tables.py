"""The result schema as tables: a run's typed result (``train.RunResult``) -> long pandas tables.

Every table is keyed by ``run_id`` and, for per-checkpoint tables, ``step``; its other key
columns say where in the record a row sits (a density bin, a confidence bin, a curve point and
class), and its value columns are the fields of one record of ``metrics`` or ``train``, in
field order. So a new field of a record is a new column here, with no other change.

=============  ===========================================  ==============================================
table          rows                                         columns after the keys
=============  ===========================================  ==============================================
status         run                                          status, bayes_loss, mutual_info
metrics        run x checkpoint                             metrics.Scalars
density        run x checkpoint x log10-density bin         metrics.DensityBins
calibration    run x checkpoint x confidence bin            metrics.ReliabilityBins
curves         run x checkpoint x point x class (optional)  model_prob, true_prob (train.Curves)
estimators     run x checkpoint x estimator x n x draw      value, lo, hi, target (estimators.Estimates)
               (optional: eval.estimator_sizes)
recalibrated   run x checkpoint (optional:                  metrics.Recalibrated
               eval.temperature_scaling)
=============  ===========================================  ==============================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
import pandas as pd

from calibjax.core import estimators, metrics, train


@dataclass(frozen=True)
class TableSpec:
    """One results table: its key columns (also its sort order) and where its values come from."""

    name: str
    keys: tuple[str, ...]  # identify a row; final tables are sorted by them (stable)
    values: tuple[str, ...]  # value columns, in order
    rows: str  # what one row is (for the docs)


# Curves of 2-D tasks have an x2 column after x; they sort by x then x2 (stable).
TABLES = {
    t.name: t
    for t in (
        TableSpec("status", ("run_id",), ("status", "bayes_loss", "mutual_info"), "run"),
        TableSpec("metrics", ("run_id", "step"), metrics.Scalars._fields, "run x checkpoint"),
        TableSpec(
            "density",
            ("run_id", "step", "log10_density_lo"),
            ("log10_density_hi", *metrics.DensityBins._fields),
            "run x checkpoint x log10-density bin",
        ),
        TableSpec(
            "calibration",
            ("run_id", "step", "conf_lo"),
            ("conf_hi", *metrics.ReliabilityBins._fields),
            "run x checkpoint x confidence bin",
        ),
        TableSpec(
            "curves",
            ("run_id", "step", "class", "x"),
            ("model_prob", "true_prob"),
            "run x checkpoint x curve point x class",
        ),
        TableSpec(
            "estimators",
            ("run_id", "step", "estimator", "n", "draw"),
            estimators.Estimates._fields,
            "run x checkpoint x calibration estimator x sample size x independent sample",
        ),
        TableSpec(
            "recalibrated",
            ("run_id", "step"),
            metrics.Recalibrated._fields,
            "run x checkpoint, after post-hoc temperature scaling",
        ),
    )
}
CHUNK_TABLES = ("status", "metrics", "density", "calibration")  # every chunk has these; the others if asked


def _long(shape: tuple[int, ...], columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """A long table over the index grid ``shape`` (row-major): each column broadcast to it."""
    return pd.DataFrame({k: np.broadcast_to(v, shape).reshape(-1) for k, v in columns.items()})


# Columns that describe the task, not the model: they stay when a run diverges.
TRUTH_COLUMNS = frozenset({"bayes_accuracy", "kl_optimum", "kl_optimum_mean", "mass", "true_prob"})


def diverged(static: train.Static, result: train.RunResult) -> np.ndarray:
    """(R, C) bool: the run has diverged by this checkpoint (its kl, or the training loss of a
    segment that trained, stopped being finite here or earlier)."""
    trained = np.diff(np.asarray((0, *static.checkpoints))) > 0
    sc = result.checkpoints.scalars
    bad = ~np.isfinite(np.asarray(sc.kl)) | (~np.isfinite(np.asarray(sc.loss)) & trained)
    return np.logical_or.accumulate(bad, axis=1)


def _f64(record, dead: np.ndarray) -> dict[str, np.ndarray]:
    """A record's fields as float64 columns; every model-dependent value is nan where ``dead``
    ((R, C): from a run's divergence on), whatever the diverged network happened to output."""
    out = {}
    for name, v in record._asdict().items():
        v = np.asarray(v, np.float64)
        if name not in TRUTH_COLUMNS:
            v = np.where(dead.reshape(dead.shape + (1,) * (v.ndim - dead.ndim)), np.nan, v)
        out[name] = v
    return out


def chunk_tables(static: train.Static, run_ids, result: train.RunResult) -> dict[str, pd.DataFrame]:
    """Turn a chunk's results (numpy, leading axis = runs) into long tables, keyed as in TABLES."""
    ids = np.asarray(run_ids, np.int64)
    steps = np.asarray(static.checkpoints, np.int64)
    r, c = len(ids), len(steps)
    ev = result.checkpoints
    dead = diverged(static, result)
    per_ckpt = {"run_id": ids[:, None], "step": steps[None, :]}
    tables = {
        "status": pd.DataFrame(
            {
                "run_id": ids,
                "status": np.where(dead[:, -1], "diverged", "ok"),
                "bayes_loss": np.asarray(result.bayes_loss, np.float64),
                "mutual_info": np.asarray(result.mutual_info, np.float64),
            }
        ),
        "metrics": _long((r, c), per_ckpt | _f64(ev.scalars, dead)),
    }
    lo, hi = static.eval.bin_bounds()
    in_bins = {k: v[..., None] for k, v in per_ckpt.items()}
    tables["density"] = _long(
        (r, c, len(lo)),
        in_bins | {"log10_density_lo": np.asarray(lo), "log10_density_hi": np.asarray(hi)} | _f64(ev.density, dead),
    )
    edges = np.linspace(0.0, 1.0, static.eval.calibration_bins + 1)
    tables["calibration"] = _long(
        (r, c, len(edges) - 1), in_bins | {"conf_lo": edges[:-1], "conf_hi": edges[1:]} | _f64(ev.reliability, dead)
    )
    if result.curves is not None:
        tables["curves"] = _curves_table(static, ids, steps, result.curves, dead)
    if ev.recalibrated is not None:
        tables["recalibrated"] = _long((r, c), per_ckpt | _f64(ev.recalibrated, dead))
    if ev.estimators is not None:
        tables["estimators"] = _estimators_table(static, ids, steps, _f64(ev.estimators, dead))
    return tables


def _curves_table(static: train.Static, ids, steps, cv: train.Curves, dead) -> pd.DataFrame:
    """curves.parquet's rows of a chunk: run x checkpoint x point x class."""
    r, c = len(ids), len(steps)
    p, m = cv.true_prob.shape[-2:]
    x = np.asarray(cv.x, np.float64)[:, None, :, None, :]  # (R, 1, P, 1, D)
    return _long(
        (r, c, p, m),
        {
            "run_id": ids[:, None, None, None],
            "step": steps[None, :, None, None],
            **{"x" if d == 0 else f"x{d + 1}": x[..., d] for d in range(static.dim)},
            "class": np.arange(1, m + 1)[None, None, None, :],
            "model_prob": np.where(dead[:, :, None, None], np.nan, np.asarray(cv.model_prob, np.float64)),
            "true_prob": np.asarray(cv.true_prob, np.float64)[:, None],
        },
    )


def _estimators_table(static: train.Static, ids, steps, est: dict) -> pd.DataFrame:
    """estimators.parquet's rows of a chunk: run x checkpoint x size x draw x estimator."""
    spec = static.eval
    r, c = len(ids), len(steps)
    z, d, e = len(spec.estimator_sizes), spec.estimator_draws, len(estimators.ESTIMATORS)
    return _long(
        (r, c, z, d, e),
        {
            "run_id": ids[:, None, None, None, None],
            "step": steps[None, :, None, None, None],
            "estimator": np.asarray(estimators.ESTIMATORS)[None, None, None, None, :],
            "n": np.asarray(spec.estimator_sizes, np.int64)[None, None, :, None, None],
            "draw": np.arange(d)[None, None, None, :, None],
            **{k: est[k] for k in ("value", "lo", "hi")},
            "target": est["target"][:, :, None, None, :],
        },
    )


def row_counts(static: train.Static) -> dict[str, tuple[int, int]]:
    """(rows, columns) per run of each table, from the shapes of the real result."""
    shapes = train.output_shapes(static)
    c = len(static.checkpoints)
    ev = shapes.checkpoints
    counts = {
        "status": (1, len(TABLES["status"].keys + TABLES["status"].values)),
        "metrics": (c, 2 + len(ev.scalars)),
        "density": (math.prod(ev.density.mass.shape), 4 + len(ev.density)),
        "calibration": (math.prod(ev.reliability.est_count.shape), 4 + len(ev.reliability)),
    }
    if shapes.curves is not None:
        counts["curves"] = (math.prod(shapes.curves.model_prob.shape), 4 + static.dim + 1)
    if ev.recalibrated is not None:
        counts["recalibrated"] = (c, 2 + len(ev.recalibrated))
    if ev.estimators is not None:
        counts["estimators"] = (math.prod(ev.estimators.value.shape), len(TABLES["estimators"].keys) + 4)
    return counts


def output_bytes(static: train.Static) -> int:
    """Bytes of one run's result on the device."""
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(train.output_shapes(static)))


def empty_status() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": pd.Series([], dtype=np.int64),
            "status": pd.Series([], dtype=str),
            "bayes_loss": pd.Series([], dtype=np.float64),
            "mutual_info": pd.Series([], dtype=np.float64),
        }
    )
