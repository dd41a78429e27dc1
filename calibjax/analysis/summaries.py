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
import re
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax.core import portable
from calibjax.storage import files, reader

DEFAULT_EPS = (1e-2, 1e-3)
DEFAULT_REL_EPS = (0.1, 0.01)
FINAL_WINDOW = 0.1
FINAL = (
    "kl",
    "kl_rel",
    "kl_optimum",
    "kl_to_optimum",
    "tv",
    "max_err",
    "err_dense",
    "err_sparse",
    "true_ece",
    "cal_term",
    "ece",
)
# The split of kl by calibration, as final_<metric>, where the sweep measured it (eval.kl_split):
SPLIT_FINAL = ("kl_cal", "kl_group", "kl_cal_top", "kl_group_top")
# After temperature scaling (recalibrated.parquet), as final_<metric>_ts, where the sweep measured it:
FINAL_SCALED = ("temperature", "kl", "err_sparse", "true_ece", "cal_term", "grouping_term")
SPLIT_SCALED = ("kl_cal", "kl_group")  # (with eval.kl_split)
# The metrics columns the per-run summaries read.
USED = ("run_id", "step", "kl", "kl_rel", "accuracy", "bayes_accuracy", *FINAL, *SPLIT_FINAL)
ID_COLUMNS = {"run_id", "seed", "group", "status", "bayes_loss", "mutual_info", "run_hash", "n_final_checkpoints"}
TIMING_PREFIXES = ("steps_to_", "sustained_")
_SENTINEL = 1e300  # stands in for inf inside quantiles; anything above _INF_FROM maps back to inf
_INF_FROM = 1e280


def eps_name(eps: float) -> str:
    return f"{eps:g}"


def _crossing(steps: np.ndarray, values: np.ndarray, i: np.ndarray, eps: float) -> np.ndarray:
    """Per row of (R, C) arrays: the step where values fall to eps between checkpoints i - 1 and i,
    on log-log axes (the first checkpoint where i == 0)."""
    r = np.arange(len(i))
    j = np.maximum(i - 1, 0)
    s0, s1, v0, v1 = steps[r, j], steps[r, i], values[r, j], values[r, i]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # rows not crossing compute junk
        lv0, lv1 = portable.log(np.maximum(v0, 1e-30)), portable.log(np.maximum(v1, 1e-30))
        t = np.where(lv1 != lv0, (portable.log(eps) - lv0) / (lv1 - lv0), 1.0)
        step = portable.exp(portable.log(s0) + t * (portable.log(s1) - portable.log(s0)))
    return np.where(i == 0, steps[:, 0], step)


def _rows(fn):
    """Let a function of (R, C) arrays also take one run's 1-D arrays (and return a float)."""

    def wrapper(steps, values, eps):
        steps, values = np.asarray(steps, float), np.asarray(values, float)
        if values.ndim == 1:
            return float(fn(steps[None], values[None], eps)[0])
        return fn(np.broadcast_to(steps, values.shape), values, eps)

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


@_rows
def steps_to_reach(steps: np.ndarray, values: np.ndarray, eps: float) -> np.ndarray:
    """First step with value <= eps, interpolated on log-log axes; inf if never; nan if the value
    is nan first. Per row of (R, C) arrays, or for one run's 1-D arrays."""
    hit = np.isnan(values) | (values <= eps)
    i = hit.argmax(axis=1)
    first = values[np.arange(len(i)), i]
    out = np.where(hit.any(axis=1), _crossing(steps, values, i, eps), math.inf)
    return np.where(np.isnan(first) & hit.any(axis=1), math.nan, out)


@_rows
def steps_to_stay(steps: np.ndarray, values: np.ndarray, eps: float) -> np.ndarray:
    """The step after which value <= eps at every later checkpoint (the last crossing), interpolated
    as steps_to_reach; inf if the last value is above eps; nan if any value is nan."""
    c = values.shape[1]
    above = values > eps
    i = np.where(above.any(axis=1), c - above[:, ::-1].argmax(axis=1), 0)  # just after the last one above
    out = np.where(i == c, math.inf, _crossing(steps, values, np.minimum(i, c - 1), eps))
    return np.where(np.isnan(values).any(axis=1), math.nan, out)


def _median(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per row: the median of the values where ``keep`` and not nan (pandas' Series.median), nan if none."""
    v = np.sort(np.where(keep, values, math.nan), axis=1)  # nan last
    n = (~np.isnan(v)).sum(axis=1)
    r = np.arange(len(v))
    lo, hi = v[r, np.maximum((n - 1) // 2, 0)], v[r, np.maximum(n // 2, 0)]
    return np.where(n == 0, math.nan, np.where(n % 2 == 1, lo, (lo + hi) / 2))


def summarize(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    eps=DEFAULT_EPS,
    rel_eps=DEFAULT_REL_EPS,
    recalibrated: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per run: learnability summaries (see the module docstring), joined to the settings;
    final_<m> of the split of kl (SPLIT_FINAL) where the sweep measured it; with ``recalibrated``
    (temperature scaling), final_<m>_ts of its FINAL_SCALED (and measured SPLIT_SCALED) columns too."""
    return runs.merge(per_run(metrics, runs, eps, rel_eps, recalibrated), on="run_id", how="right")


def per_run(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    eps=DEFAULT_EPS,
    rel_eps=DEFAULT_REL_EPS,
    recalibrated: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The summaries of ``summarize`` alone (run_id and the summary columns), sorted by run_id.

    Vectorised: the runs with the same number of checkpoints form one (runs x checkpoints) array
    per metric, and every summary is an array operation over it.
    """
    measured = lambda table, names: [k for k in names if k in table and table[k].notna().any()]  # noqa: E731
    finals = [*FINAL, *measured(metrics, SPLIT_FINAL)]
    if recalibrated is not None:
        scaled = {k: f"{k}_ts" for k in (*FINAL_SCALED, *measured(recalibrated, SPLIT_SCALED))}
        metrics = metrics.merge(
            recalibrated[["run_id", "step", *scaled]].rename(columns=scaled), on=["run_id", "step"], how="left"
        )
        finals += list(scaled.values())
    step, run = metrics["step"].to_numpy(), metrics["run_id"].to_numpy()
    rows = np.flatnonzero(step > 0)
    rows = rows[np.lexsort((step[rows], run[rows]))]  # by run, then step
    run_ids, starts, counts = np.unique(run[rows], return_index=True, return_counts=True)
    diverged_ids = runs.loc[runs["status"] == "diverged", "run_id"].to_numpy()
    thresholds = [("kl", e) for e in eps] + [("kl_rel", e) for e in rel_eps]
    columns = {k: metrics[k].to_numpy(float)[rows] for k in (*USED, *finals) if k != "run_id" and k in metrics}
    del step, run, rows, metrics
    parts = []
    for c in np.unique(counts):  # runs with c checkpoints: one (R, c) array per column
        sel = counts == c
        rows = starts[sel][:, None] + np.arange(c)
        col = {k: v[rows] for k, v in columns.items()}
        diverged = np.isin(run_ids[sel], diverged_ids)
        parts.append(pd.DataFrame({"run_id": run_ids[sel], **_summaries(col, diverged, thresholds, finals)}))
    done = pd.concat(parts).sort_values("run_id", kind="stable") if parts else pd.DataFrame({"run_id": []})
    return done.reset_index(drop=True)


def _summaries(col: dict[str, np.ndarray], diverged: np.ndarray, thresholds, finals) -> dict[str, np.ndarray]:
    """The summary columns of runs with the same checkpoints: ``col`` holds (runs x checkpoints)
    arrays of step and every metric; a diverged run's summaries are nan."""
    steps = col["step"]
    out = {}
    for metric, e in thresholds:
        values, name = col[metric], f"{metric}_{eps_name(e)}"
        reach = np.where(diverged, math.nan, steps_to_reach(steps, values, e))
        out[f"steps_to_{name}"] = reach
        out[f"reached_{name}"] = np.isfinite(reach)
        out[f"sustained_{name}"] = np.where(diverged, math.nan, steps_to_stay(steps, values, e))
    window = steps >= (1 - FINAL_WINDOW) * steps[:, -1:]
    out["n_final_checkpoints"] = window.sum(axis=1)
    for k in finals:
        missing = np.full(len(steps), math.nan)
        out[f"final_{k}"] = missing if k not in col else np.where(diverged, math.nan, _median(col[k], window))
    gap = col["bayes_accuracy"] - col["accuracy"]
    out["final_accuracy_gap"] = np.where(diverged, math.nan, _median(gap, window))
    logs = portable.log(steps)  # (the base cancels in the ratio)
    c = steps.shape[1]
    auc = np.trapezoid(col["kl"], logs, axis=1) / (logs[:, -1] - logs[:, 0]) if c >= 2 else np.full(len(steps), np.nan)
    out["kl_auc"] = np.where(diverged, math.nan, auc)
    return out


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
    if (
        "hidden" in cols
        and {"width", "depth"} & set(cols)
        and runs.groupby(["width", "depth"])["hidden"].nunique().max() == 1
    ):
        cols.remove("hidden")
    return cols


def group_quantiles(values: np.ndarray, group: np.ndarray, n_groups: int, qs) -> list[np.ndarray]:
    """Per group: np.quantile (linear) of its non-nan values, one array per q, nan for a group with
    none. inf stays inf: it is a finite sentinel while interpolating. One sort for every group; the
    interpolation is numpy's own (``_lerp``), so each value equals np.quantile's bit for bit."""
    ok = ~np.isnan(values)
    v, g = values[ok], group[ok]
    v = np.where(np.isinf(v), np.sign(v) * _SENTINEL, v)
    order = np.lexsort((v, g))
    v, g = v[order], g[order]
    n = np.bincount(g, minlength=n_groups)
    start = np.concatenate(([0], np.cumsum(n)[:-1]))
    out = []
    for q in qs:
        virtual = n * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's virtual index, method "linear"
        prev = np.floor(virtual)
        gamma = virtual - prev
        top = virtual >= n - 1
        i0 = np.where(top, n - 1, prev).astype(np.intp)
        i1 = np.where(top, n - 1, prev + 1).astype(np.intp)
        a, b = (v[np.clip(start + i, 0, len(v) - 1)] if len(v) else np.zeros(n_groups) for i in (i0, i1))
        diff = b - a
        r = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
        r = np.where(np.abs(r) >= _INF_FROM, np.copysign(math.inf, r), r)
        out.append(np.where(n == 0, math.nan, r))
    return out


FINAL_COLUMNS = frozenset(
    {f"final_{k}" for k in (*FINAL, *SPLIT_FINAL, "accuracy_gap")}
    | {f"final_{k}_ts" for k in (*FINAL_SCALED, *SPLIT_SCALED)}
)


def value_columns(summary: pd.DataFrame) -> list[str]:
    """The summaries (not settings: a setting may start with final_, like final_lr_ratio)."""
    return [c for c in summary.columns if c.startswith(TIMING_PREFIXES) or c in FINAL_COLUMNS or c == "kl_auc"]


def setting_columns(agg: pd.DataFrame) -> list[str]:
    """The columns of summary_by_setting that name a grid point (case and grid axes), not the
    summaries, their quartiles or the run counts."""
    values = set(value_columns(agg))
    return [c for c in agg.columns if c not in values and not c.startswith("n_") and not re.search(r"_q\d\d$", c)]


def aggregate(summary: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Median and interquartile range of every summary over seeds, per grid point (vectorised:
    one sort per summary column for every grid point at once)."""
    by = by if by is not None else ["case", *swept_columns(summary)]
    by = [c for c in by if c in summary.columns and not c.startswith("reached_")]
    groups = summary.groupby(by, sort=True, dropna=False)
    code = groups.ngroup().to_numpy()
    sizes = groups.size()
    out = sizes.index.to_frame(index=False) if len(by) else pd.DataFrame(index=range(len(sizes)))
    n = len(sizes)
    cols = {"n_runs": sizes.to_numpy()}
    cols["n_diverged"] = np.bincount(code, weights=(summary["status"] == "diverged").to_numpy(), minlength=n).astype(
        np.int64
    )
    for c in value_columns(summary):
        v = summary[c].to_numpy(float)
        cols[c], cols[f"{c}_q25"], cols[f"{c}_q75"] = group_quantiles(v, code, n, (0.5, 0.25, 0.75))
        if c.startswith(TIMING_PREFIXES):
            cols[f"n_never_{c}"] = np.bincount(code, weights=np.isinf(v), minlength=n).astype(np.int64)
    return pd.concat([out, pd.DataFrame(cols, index=out.index)], axis=1)  # (one insert: wide sweeps have hundreds)


BENCHMARK_KEYS = ("estimator", "n", "step")


def estimator_benchmark(
    estimates: pd.DataFrame, runs: pd.DataFrame | None = None, by: tuple[str, ...] = ()
) -> pd.DataFrame:
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
    df = df.assign(
        err=err,
        sq=err**2,
        rel=err / df["target"],
        rel_sq=(err / df["target"]) ** 2,
        covered=((df["lo"] <= df["target"]) & (df["target"] <= df["hi"])).where(df["lo"].notna()),
        width=df["hi"] - df["lo"],
    )
    spread = df.groupby([*keys, "run_id"], sort=True)["value"].var(ddof=1).groupby(keys).mean()
    g = df.groupby(keys, sort=True)
    out = pd.DataFrame(
        {
            "target": g["target"].mean(),
            "bias": g["err"].mean(),
            "sd": np.sqrt(spread),
            "rmse": np.sqrt(g["sq"].mean()),
            "rel_bias": g["rel"].mean(),
            "rel_rmse": np.sqrt(g["rel_sq"].mean()),
            "coverage": g["covered"].mean(),
            "width": g["width"].mean(),
            "samples": g.size(),
        }
    )
    return out.reset_index()


def write_summaries(out: str | Path, eps=DEFAULT_EPS, rel_eps=DEFAULT_REL_EPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """summary.parquet (per run) and summary_by_setting.parquet (over seeds) in a results directory;
    estimator_benchmark.parquet too where the sweep ran the estimator benchmark."""
    out = Path(out)
    t = reader.load_results(out, ("runs", "recalibrated", "estimators"))
    if not (out / "metrics.parquet").exists():
        raise FileNotFoundError(f"{out}: no metrics.parquet; run (or merge) the sweep first")
    columns = [c for c in reader.table_columns(out, "metrics") if c in USED]
    # The metrics are read where they are used, and freed before the join (a million runs' worth is 0.3 GB).
    found = per_run(reader.read_table(out, "metrics", columns=columns), t["runs"], eps, rel_eps, t.get("recalibrated"))
    summary = t.pop("runs").merge(found, on="run_id", how="right")
    del found
    agg = aggregate(summary)
    generation = reader.generation(out)  # that of the tables they are drawn from
    with files.Staged() as staged:
        files.write_parquet(out / "summary.parquet", summary, generation=generation, staged=staged)
        files.write_parquet(out / "summary_by_setting.parquet", agg, generation=generation, staged=staged)
        benchmark = out / "estimator_benchmark.parquet"
        if "estimators" in t:
            bench = estimator_benchmark(t["estimators"])
            files.write_parquet(benchmark, bench, generation=generation, staged=staged)
        else:
            staged.removed.append(benchmark)
        from calibjax.analysis import density_law  # (it builds on this module)

        density_law.stage(out, summary, generation, staged)
        staged.commit()
    return summary, agg
