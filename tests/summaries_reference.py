"""0.5.0's per-run summaries, kept as the independent reference that the vectorised
``calibjax.analysis.summaries`` must equal bit for bit (Python loops per run and per grid point). Since 0.9.0
both take their logarithms and exponentials from ``calibjax.portable`` (numpy's and the C library's
differ between CPUs in the last bit); that module is tested on its own (tests/test_portable.py)."""

import math

import numpy as np
import pandas as pd

from calibjax.analysis.summaries import (
    _INF_FROM,
    _SENTINEL,
    DEFAULT_EPS,
    DEFAULT_REL_EPS,
    FINAL,
    FINAL_SCALED,
    FINAL_WINDOW,
    SPLIT_FINAL,
    SPLIT_SCALED,
    TIMING_PREFIXES,
    eps_name,
    swept_columns,
    value_columns,
)
from calibjax.core.portable import exp, log


def _crossing(steps: np.ndarray, values: np.ndarray, i: int, eps: float) -> float:
    """The step where values fall to eps between checkpoints i - 1 and i, on log-log axes."""
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    lv0, lv1 = log(max(v0, 1e-30)), log(max(v1, 1e-30))
    t = (log(eps) - lv0) / (lv1 - lv0) if lv1 != lv0 else 1.0
    return float(exp(log(s0) + t * (log(s1) - log(s0))))


def steps_to_reach(steps: np.ndarray, values: np.ndarray, eps: float) -> float:
    """First step with value <= eps, interpolated on log-log axes; inf if never; nan if the value
    is nan first."""
    for i, v in enumerate(values):
        if np.isnan(v):
            return math.nan
        if v <= eps:
            return _crossing(steps, values, i, eps)
    return math.inf


def steps_to_stay(steps: np.ndarray, values: np.ndarray, eps: float) -> float:
    """The step after which value <= eps at every later checkpoint (the last crossing), interpolated
    as steps_to_reach; inf if the last value is above eps; nan if any value is nan."""
    if np.isnan(values).any():
        return math.nan
    above = np.flatnonzero(values > eps)
    if len(above) == 0:
        return float(steps[0])
    i = int(above[-1]) + 1
    return math.inf if i == len(values) else _crossing(steps, values, i, eps)


def summarize(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    eps=DEFAULT_EPS,
    rel_eps=DEFAULT_REL_EPS,
    recalibrated: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per run: learnability summaries (see the module docstring), joined to the settings;
    final_<m> of the split of kl where any run measured it; with ``recalibrated`` (temperature
    scaling), final_<m>_ts of its FINAL_SCALED columns (and of SPLIT_SCALED where measured) too."""
    finals = list(FINAL) + [k for k in SPLIT_FINAL if k in metrics and not metrics[k].isna().all()]
    if recalibrated is not None:
        extra = [k for k in SPLIT_SCALED if k in recalibrated and not recalibrated[k].isna().all()]
        scaled = {k: f"{k}_ts" for k in (*FINAL_SCALED, *extra)}
        metrics = metrics.merge(
            recalibrated[["run_id", "step", *scaled]].rename(columns=scaled), on=["run_id", "step"], how="left"
        )
        finals += list(scaled.values())
    rows = []
    status = runs.set_index("run_id")["status"]
    thresholds = [("kl", e) for e in eps] + [("kl_rel", e) for e in rel_eps]
    for run_id, m in metrics[metrics["step"] > 0].sort_values(["run_id", "step"]).groupby("run_id"):
        steps = m["step"].to_numpy(float)
        diverged = status.get(run_id) == "diverged"
        row = {"run_id": run_id}
        for metric, e in thresholds:
            values = m[metric].to_numpy(float)
            name = f"{metric}_{eps_name(e)}"
            reach = math.nan if diverged else steps_to_reach(steps, values, e)
            row[f"steps_to_{name}"] = reach
            row[f"reached_{name}"] = bool(np.isfinite(reach))
            row[f"sustained_{name}"] = math.nan if diverged else steps_to_stay(steps, values, e)
        window = m[m["step"] >= (1 - FINAL_WINDOW) * steps[-1]]
        row["n_final_checkpoints"] = len(window)
        for k in finals:
            row[f"final_{k}"] = math.nan if diverged or k not in m else float(window[k].median())
        gap = window["bayes_accuracy"] - window["accuracy"]
        row["final_accuracy_gap"] = math.nan if diverged else float(gap.median())
        kl = m["kl"].to_numpy(float)
        logs = log(steps)
        row["kl_auc"] = math.nan if diverged or len(steps) < 2 else float(np.trapezoid(kl, logs) / (logs[-1] - logs[0]))
        rows.append(row)
    return runs.merge(pd.DataFrame(rows), on="run_id", how="right")


def _quantile(values: pd.Series, q: float) -> float:
    v = values.to_numpy(float)
    v = v[~np.isnan(v)]
    if not len(v):
        return math.nan
    r = float(np.quantile(np.where(np.isinf(v), np.sign(v) * _SENTINEL, v), q))
    return math.copysign(math.inf, r) if abs(r) >= _INF_FROM else r


def aggregate(summary: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Median and interquartile range of every summary over seeds, per grid point."""
    by = by if by is not None else ["case", *swept_columns(summary)]
    by = [c for c in by if c in summary.columns and not c.startswith("reached_")]
    rows = []
    for key, g in summary.groupby(by, sort=True, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row["n_runs"] = len(g)
        row["n_diverged"] = int((g["status"] == "diverged").sum())
        for c in value_columns(summary):
            for name, q in (("median", 0.5), ("q25", 0.25), ("q75", 0.75)):
                row[f"{c}_{name}" if name != "median" else c] = _quantile(g[c], q)
            if c.startswith(TIMING_PREFIXES):
                row[f"n_never_{c}"] = int(np.isinf(g[c]).sum())
        rows.append(row)
    return pd.DataFrame(rows)
