"""Learnability summaries from the result tables: per run, then over seeds per grid point.

Per run (``summarize``), for kl (thresholds ``eps``, nats) and kl_rel = kl / I(C;X) (thresholds
``rel_eps``, a share of the learnable information):
- ``steps_to_<metric>_<eps>``: the first step at which the metric is <= eps, interpolated
  linearly in (log step, log metric) between the two checkpoints around the crossing; the first
  checkpoint if it is already below eps there. ``inf`` when never reached ("never"), ``nan`` for
  diverged runs; ``reached_<metric>_<eps>`` says which.
- ``sustained_<metric>_<eps>``: the same, for the last crossing: the step after which the metric
  stays <= eps at every later checkpoint (``inf`` if it is above eps at the last one). With a
  constant learning rate the error jumps between checkpoints; a first crossing can sit inside that
  noise band, the sustained one cannot.
- ``final_<metric>``: the median over the checkpoints in the last FINAL_WINDOW (10 %) of training
  (kl, kl_rel, kl_optimum, kl_to_optimum, tv, max_err, err_dense, err_sparse, true_ece, cal_term, ece,
  accuracy_gap = bayes_accuracy - accuracy; with temperature scaling also temperature, kl, err_sparse,
  true_ece, cal_term and grouping_term after it, as final_<metric>_ts). Default checkpoints put
  three there (0.9, 0.95 x steps and steps); with hand-set checkpoints it may be the last one
  alone. ``n_final_checkpoints`` says how many.
- ``kl_auc``: area under kl against log10(step) over the checkpoints (step > 0), divided by the
  log10 range: the mean kl on a log-step axis, lower is learned sooner.
Over seeds (``aggregate``): median, 25 % and 75 % quantiles of each summary per grid point, with
n_runs, n_diverged and n_never_<...> for each steps_to_ and sustained_ column. "never" stays
infinite through the quantiles.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax import store

DEFAULT_EPS = (1e-2, 1e-3)
DEFAULT_REL_EPS = (0.1, 0.01)
FINAL_WINDOW = 0.1
FINAL = ("kl", "kl_rel", "kl_optimum", "kl_to_optimum", "tv", "max_err", "err_dense", "err_sparse", "true_ece",
         "cal_term", "ece")
# After temperature scaling (recalibrated.parquet), as final_<metric>_ts, where the sweep measured it:
FINAL_SCALED = ("temperature", "kl", "err_sparse", "true_ece", "cal_term", "grouping_term")
ID_COLUMNS = {"run_id", "seed", "group", "status", "bayes_loss", "mutual_info", "run_hash", "n_final_checkpoints"}
TIMING_PREFIXES = ("steps_to_", "sustained_")
_SENTINEL = 1e300  # stands in for inf inside quantiles; anything above _INF_FROM maps back to inf
_INF_FROM = 1e280


def eps_name(eps: float) -> str:
    return f"{eps:g}"


def _crossing(steps: np.ndarray, values: np.ndarray, i: int, eps: float) -> float:
    """The step where values fall to eps between checkpoints i - 1 and i, on log-log axes."""
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    lv0, lv1 = math.log(max(v0, 1e-30)), math.log(max(v1, 1e-30))
    t = (math.log(eps) - lv0) / (lv1 - lv0) if lv1 != lv0 else 1.0
    return float(math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0))))


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


def summarize(metrics: pd.DataFrame, runs: pd.DataFrame, eps=DEFAULT_EPS, rel_eps=DEFAULT_REL_EPS,
              recalibrated: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run: learnability summaries (see the module docstring), joined to the settings;
    with ``recalibrated`` (temperature scaling), final_<m>_ts of its FINAL_SCALED columns too."""
    finals = list(FINAL)
    if recalibrated is not None:
        scaled = {k: f"{k}_ts" for k in FINAL_SCALED}
        metrics = metrics.merge(recalibrated[["run_id", "step", *scaled]].rename(columns=scaled),
                                on=["run_id", "step"], how="left")
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
        logs = np.log10(steps)
        row["kl_auc"] = (math.nan if diverged or len(steps) < 2 else
                         float(np.trapezoid(kl, logs) / (logs[-1] - logs[0])))
        rows.append(row)
    return runs.merge(pd.DataFrame(rows), on="run_id", how="right")


def swept_columns(runs: pd.DataFrame) -> list[str]:
    """Settings that vary within a case (besides seed): the grid axes of a sweep.

    Settings fixed by the case are left out: the case name stands for them; so is ``hidden`` where
    ``width`` and ``depth`` determine it (a grid over them).
    """
    cols, summaries = [], set(value_columns(runs))
    for c in runs.columns:
        if c in ID_COLUMNS or c == "case" or c in summaries or c.startswith("reached_"):
            continue
        if runs.groupby("case")[c].nunique(dropna=False).max() > 1:
            cols.append(c)
    if "hidden" in cols and {"width", "depth"} & set(cols) and \
            runs.groupby(["width", "depth"])["hidden"].nunique().max() == 1:
        cols.remove("hidden")
    return cols


def _quantile(values: pd.Series, q: float) -> float:
    v = values.to_numpy(float)
    v = v[~np.isnan(v)]
    if not len(v):
        return math.nan
    r = float(np.quantile(np.where(np.isinf(v), np.sign(v) * _SENTINEL, v), q))
    return math.copysign(math.inf, r) if abs(r) >= _INF_FROM else r


FINAL_COLUMNS = frozenset({f"final_{k}" for k in (*FINAL, "accuracy_gap")})


def value_columns(summary: pd.DataFrame) -> list[str]:
    """The summaries (not settings: a setting may start with final_, like final_lr_ratio)."""
    return [c for c in summary.columns if c.startswith(TIMING_PREFIXES) or c in FINAL_COLUMNS or c == "kl_auc"]


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


BENCHMARK_KEYS = ("estimator", "n", "step")


def estimator_benchmark(estimates: pd.DataFrame, runs: pd.DataFrame | None = None,
                        by: tuple[str, ...] = ()) -> pd.DataFrame:
    """The calibration-estimator benchmark: per estimator x sample size x checkpoint (and ``by``,
    run columns such as ``case``), over every run and independent sample there:

    - ``target``: mean exact value estimated; ``bias``: mean of estimate - target; ``sd``: the
      estimate's spread for a fixed model (root mean over runs of the variance over draws);
      ``rmse``: root mean square of estimate - target;
    - ``rel_bias``, ``rel_rmse``: the same relative to each run's target (mean of (estimate -
      target) / target; its root mean square);
    - ``coverage``: share of intervals [lo, hi] holding the target (nominal 0.9; nan without
      intervals), ``width``: their mean width; ``samples``: estimates pooled (diverged runs left out).
    """
    df = estimates[np.isfinite(estimates["value"]) & np.isfinite(estimates["target"])]
    if by:
        df = df.merge(runs[["run_id", *by]], on="run_id")
    keys = [*BENCHMARK_KEYS, *by]
    err = df["value"] - df["target"]
    df = df.assign(err=err, sq=err ** 2, rel=err / df["target"], rel_sq=(err / df["target"]) ** 2,
                   covered=((df["lo"] <= df["target"]) & (df["target"] <= df["hi"])).where(df["lo"].notna()),
                   width=df["hi"] - df["lo"])
    spread = df.groupby([*keys, "run_id"], sort=True)["value"].var(ddof=1).groupby(keys).mean()
    g = df.groupby(keys, sort=True)
    out = pd.DataFrame({"target": g["target"].mean(), "bias": g["err"].mean(), "sd": np.sqrt(spread),
                        "rmse": np.sqrt(g["sq"].mean()), "rel_bias": g["rel"].mean(),
                        "rel_rmse": np.sqrt(g["rel_sq"].mean()), "coverage": g["covered"].mean(),
                        "width": g["width"].mean(), "samples": g.size()})
    return out.reset_index()


def write_summaries(out: str | Path, eps=DEFAULT_EPS, rel_eps=DEFAULT_REL_EPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """summary.parquet (per run) and summary_by_setting.parquet (over seeds) in a results directory;
    estimator_benchmark.parquet too where the sweep ran the estimator benchmark."""
    out = Path(out)
    t = store.load_results(out)
    if "metrics" not in t:
        raise FileNotFoundError(f"{out}: no metrics.parquet; run (or merge) the sweep first")
    summary = summarize(t["metrics"], t["runs"], eps, rel_eps, t.get("recalibrated"))
    agg = aggregate(summary)
    store.write_parquet(out / "summary.parquet", summary)
    store.write_parquet(out / "summary_by_setting.parquet", agg)
    if "estimators" in t:
        store.write_parquet(out / "estimator_benchmark.parquet", estimator_benchmark(t["estimators"]))
    return summary, agg
