"""Learnability summaries from the result tables: per run, then over seeds per grid point.

Per run (``summarize``):
- ``steps_to_kl_<eps>``: the first step at which kl <= eps, interpolated linearly in
  (log step, log kl) between the two checkpoints around the crossing; the first checkpoint if kl
  is already below eps there. ``inf`` when never reached ("never"), ``nan`` for diverged runs;
  ``reached_kl_<eps>`` says which.
- ``final_<metric>``: the value at the last checkpoint (kl, tv, max_err, err_dense, err_sparse,
  true_ece, ece, accuracy_gap = bayes_accuracy - accuracy).
- ``kl_auc``: area under kl against log10(step) over the checkpoints (step > 0), divided by the
  log10 range: the mean kl on a log-step axis, lower is learned sooner.
Over seeds (``aggregate``): median, 25 % and 75 % quantiles of each summary per grid point, with
n_runs, n_diverged and n_never_<eps>. "never" stays infinite through the quantiles.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax import store

DEFAULT_EPS = (1e-2, 1e-3)
FINAL = ("kl", "tv", "max_err", "err_dense", "err_sparse", "true_ece", "ece")
ID_COLUMNS = {"run_id", "seed", "group", "status", "bayes_loss", "run_hash"}
_SENTINEL = 1e300  # stands in for inf inside quantiles; anything above _INF_FROM maps back to inf
_INF_FROM = 1e280


def eps_name(eps: float) -> str:
    return f"{eps:g}"


def steps_to_reach(steps: np.ndarray, kl: np.ndarray, eps: float) -> float:
    """First step with kl <= eps, interpolated on log-log axes; inf if never; nan if kl is nan first."""
    for i, (s, v) in enumerate(zip(steps, kl, strict=True)):
        if np.isnan(v):
            return math.nan
        if v <= eps:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], kl[i - 1]
            lv0, lv1 = math.log(max(v0, 1e-30)), math.log(max(v, 1e-30))
            t = (math.log(eps) - lv0) / (lv1 - lv0) if lv1 != lv0 else 1.0
            return float(math.exp(math.log(s0) + t * (math.log(s) - math.log(s0))))
    return math.inf


def summarize(metrics: pd.DataFrame, runs: pd.DataFrame, eps=DEFAULT_EPS) -> pd.DataFrame:
    """One row per run: learnability summaries (see the module docstring), joined to the settings."""
    rows = []
    status = runs.set_index("run_id")["status"]
    for run_id, m in metrics[metrics["step"] > 0].sort_values(["run_id", "step"]).groupby("run_id"):
        steps, kl = m["step"].to_numpy(float), m["kl"].to_numpy(float)
        diverged = status.get(run_id) == "diverged"
        row = {"run_id": run_id}
        for e in eps:
            reach = math.nan if diverged else steps_to_reach(steps, kl, e)
            row[f"steps_to_kl_{eps_name(e)}"] = reach
            row[f"reached_kl_{eps_name(e)}"] = bool(np.isfinite(reach))
        last = m.iloc[-1]
        for k in FINAL:
            row[f"final_{k}"] = math.nan if diverged else float(last[k]) if k in m else math.nan
        row["final_accuracy_gap"] = math.nan if diverged else float(last["bayes_accuracy"] - last["accuracy"])
        logs = np.log10(steps)
        row["kl_auc"] = (math.nan if diverged or len(steps) < 2 else
                         float(np.trapezoid(kl, logs) / (logs[-1] - logs[0])))
        rows.append(row)
    return runs.merge(pd.DataFrame(rows), on="run_id", how="right")


def swept_columns(runs: pd.DataFrame) -> list[str]:
    """Settings that vary within a case (besides seed): the grid axes of a sweep.

    Settings fixed by the case are left out: the case name stands for them.
    """
    cols = []
    for c in runs.columns:
        if c in ID_COLUMNS or c == "case" or c.startswith(("reached_", "steps_to_", "final_")) or c == "kl_auc":
            continue
        if runs.groupby("case")[c].nunique(dropna=False).max() > 1:
            cols.append(c)
    return cols


def _quantile(values: pd.Series, q: float) -> float:
    v = values.to_numpy(float)
    v = v[~np.isnan(v)]
    if not len(v):
        return math.nan
    r = float(np.quantile(np.where(np.isinf(v), np.sign(v) * _SENTINEL, v), q))
    return math.copysign(math.inf, r) if abs(r) >= _INF_FROM else r


def value_columns(summary: pd.DataFrame) -> list[str]:
    return [c for c in summary.columns if c.startswith(("steps_to_kl_", "final_")) or c == "kl_auc"]


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
            if c.startswith("steps_to_kl_"):
                row[f"n_never_{c[len('steps_to_kl_'):]}"] = int(np.isinf(g[c]).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def write_summaries(out: str | Path, eps=DEFAULT_EPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """summary.parquet (per run) and summary_by_setting.parquet (over seeds) in a results directory."""
    out = Path(out)
    t = store.load_results(out)
    if "metrics" not in t:
        raise FileNotFoundError(f"{out}: no metrics.parquet; run (or merge) the sweep first")
    summary = summarize(t["metrics"], t["runs"], eps)
    agg = aggregate(summary)
    store.write_parquet(out / "summary.parquet", summary)
    store.write_parquet(out / "summary_by_setting.parquet", agg)
    return summary, agg
