"""Which figures a results directory gets, apart from drawing them (``calibjax.analysis.plots``).

``standard_figures(out)`` draws the default set: ``default_set`` chooses it from the tables (each
choice a ``Planned`` figure: its path and how to draw it), so a test can ask what would be drawn.
``draw(out, kind, ...)`` draws one figure on request (``calibjax plot``), naming the runs it shows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax.analysis import FIGURE_KINDS, density_law, plots, summaries
from calibjax.storage import files, owned, reader


@dataclass(frozen=True)
class Planned:
    path: Path
    draw: Callable[[], Path]


def standard_figures(out: str | Path) -> list[Path]:
    """The default figures of a results directory, from its tables and manifest (recorded as
    calibjax's in DIR/figures, so that --overwrite removes exactly these)."""
    paths = [planned.draw() for planned in default_set(out)]
    owned.record_figures(Path(out), paths, reader.generation(out))
    return paths


def default_set(out: str | Path) -> list[Planned]:
    """The default figures: kl against steps always; per-case figures for a few cases without grid
    axes; posterior curves where recorded; the loss, estimator and grid figures where they apply."""
    out = Path(out)
    t = reader.Results(out)  # each table read when a figure needs it
    runs = t["runs"]
    cases = list(dict.fromkeys(runs["case"]))
    axes = summaries.swept_columns(runs)
    # Per-case figures pool a case's seeds; with grid axes they would pool unlike runs, so the
    # grid gets its own figures (summary heatmaps and lines) instead.
    small = len(cases) <= plots.MAX_PANELS and not axes
    metrics = reader.read_table(out, "metrics", columns=["run_id", "step", "kl"])
    last = int(metrics["step"].max())
    fig_dir = out / "figures"
    planned = []
    if (runs["dim"] == 1).any() and small:
        planned.append(_plan(fig_dir / "densities.png", plots.densities, runs))
    planned.append(_kl_lines(metrics, runs, cases, axes, fig_dir))
    if small:
        planned += _per_case(t, runs, cases, last, fig_dir)
    if "curves" in t and small:
        planned += _posteriors(out, t, runs, fig_dir)
    if "summary" in t and "loss" in runs and runs["loss"].nunique() > 1:
        planned.append(_plan(fig_dir / "losses.png", plots.loss_comparison, t["summary"]))
    if "estimator_benchmark" in t:
        path = fig_dir / "estimator_benchmark.png"
        planned.append(_plan(path, plots.estimator_benchmark, t["estimator_benchmark"]))
    if "density_law" in t:
        path = fig_dir / "density_law.png"
        planned.append(_plan(path, density_law.figure, t["density_times"], t["density_law"], runs))
    if "summary_by_setting" in t:
        agg = t["summary_by_setting"]
        axes = [c for c in axes if c in agg.columns and agg[c].nunique() > 1]
        if len(axes) == 1:
            planned += _grid_lines(out, agg, runs, axes[0], cases, last, fig_dir)
        planned += _heatmaps(agg, axes, cases, fig_dir)
    return planned


def _plan(path: Path, fn, *args, **kw) -> Planned:
    return Planned(path, functools.partial(fn, *args, path=path, **kw))


def _kl_lines(metrics: pd.DataFrame, runs: pd.DataFrame, cases: list, axes: list, fig_dir: Path) -> Planned:
    """kl against steps. Lines of a grid sweep: one per value of its first grid axis of at most 12
    values, the others pooled (and named in the title); otherwise one per case."""
    few = [a for a in axes if runs[a].nunique() <= 12] if len(cases) == 1 else []
    line_by = few[0] if few else "case"
    pooled = [a for a in axes if a != line_by]
    title = f"pooled over {', '.join(pooled)} and seeds" if pooled else ""
    return _plan(fig_dir / "kl_vs_steps.png", plots.kl_vs_steps, metrics, runs, by=line_by, title=title)


def _per_case(t: reader.Results, runs: pd.DataFrame, cases: list, last: int, fig_dir: Path) -> list[Planned]:
    path = fig_dir / "error_by_density.png"
    planned = [Planned(path, lambda path=path: plots.error_by_density(t["density"], runs, path))]
    if "calibration" in t:
        for case in cases:
            ids = runs.loc[runs["case"] == case, "run_id"]
            path = fig_dir / f"reliability_{case}.png"
            planned.append(_plan(path, plots.reliability, t["calibration"], ids, last, title=f"{case}: step {last}"))
    return planned


def _posteriors(out: Path, t: reader.Results, runs: pd.DataFrame, fig_dir: Path) -> list[Planned]:
    """Each case's posterior curves (1-D) or map (2-D) at its plot_steps (default: three spread out)."""
    plot_steps = (files.read_manifest(out) or {}).get("plot_steps") or {}
    curves = t["curves"]
    checkpoints = sorted(curves["step"].unique())
    spread = sorted({checkpoints[0], checkpoints[len(checkpoints) // 2], checkpoints[-1]})
    dims = runs.groupby("case")["dim"].first()
    planned = []
    for case in runs.loc[runs["run_id"].isin(curves["run_id"].unique()), "case"].unique():
        draw = plots.posterior_curves if dims[case] == 1 else plots.posterior_map
        path = fig_dir / f"posterior_{case}.png"
        planned.append(Planned(path, functools.partial(draw, curves, runs, case, plot_steps.get(case, spread), path)))
    return planned


def _grid_lines(out, agg, runs, axis: str, cases: list, last: int, fig_dir: Path) -> list[Planned]:
    """A one-axis grid: final values against the axis, and the error by density along it."""
    planned = []
    for value in ("final_kl", "final_err_dense", "final_err_sparse"):
        planned.append(_plan(fig_dir / f"{value}_vs_{axis}.png", plots.summary_lines, agg, axis, value))
    if len(cases) <= plots.MAX_PANELS:
        path = fig_dir / f"error_by_density_vs_{axis}.png"
        density = functools.partial(reader.read_table, out, "density", filters=[("step", "==", last)])
        planned.append(Planned(path, lambda path=path: plots.error_by_density(density(), runs, path, x=axis)))
    return planned


def _heatmaps(agg: pd.DataFrame, axes: list, cases: list, fig_dir: Path) -> list[Planned]:
    """Learnability maps over the first two numeric grid axes. A map's x and y must be numbers; a
    third axis (a number or a name, such as activation) is drawn side by side. A map pooled over
    unlike tasks would mislead: with two axes the cases sit side by side; with a third axis each
    case gets its own file. Where the task varies, so does its learnable information I(C;X):
    thresholds on kl_rel compare like with like; otherwise kl in nats."""
    numeric = [c for c in axes if pd.api.types.is_numeric_dtype(agg[c])]
    if len(numeric) < 2:
        return []
    axes = numeric + [c for c in axes if c not in numeric]
    facet = axes[2] if len(axes) > 2 and agg[axes[2]].nunique() <= plots.MAX_PANELS else None
    per_case = [(None, agg)]
    if len(cases) > 1 and facet is None and len(cases) <= plots.MAX_PANELS:
        facet = "case"
    elif len(cases) > 1:
        per_case = [(case, agg[agg["case"] == case]) for case in cases]
    metric = "kl_rel" if any(plots.TASK_COLUMN.match(c) for c in axes[:2]) else "kl"
    timing = [
        c
        for c in agg.columns
        for prefix in summaries.TIMING_PREFIXES
        if c.startswith(f"{prefix}{metric}_") and plots.is_number(c[len(f"{prefix}{metric}_") :])
    ]
    planned = []
    for value in timing + [f"final_{metric}"]:
        for case, d in per_case:
            name = f"heatmap_{value}.png" if case is None else f"heatmap_{value}_{case}.png"
            title = None if case is None else f"{case}: {value}, median over seeds"
            planned.append(_plan(fig_dir / name, plots.heatmap, d, axes[0], axes[1], value, facet=facet, title=title))
    return planned


def draw(
    out: str | Path,
    kind: str = "standard",
    *,
    x: str | None = None,
    y: str | None = None,
    value: str | None = None,
    facet: str | None = None,
    where: dict[str, str] | None = None,
    run_id: int | None = None,
    step: int | None = None,
    output: str | Path | None = None,
) -> list[Path]:
    """``calibjax plot``: the default set, or one heatmap, density map or reliability diagram of
    the runs selected by ``where`` (setting = value) or ``run_id``. Mistakes raise PlotError."""
    paths = _draw(out, kind, x, y, value, facet, where, run_id, step, output)
    owned.record_figures(Path(out), paths, reader.generation(out))
    return paths


def _draw(out, kind, x, y, value, facet, where, run_id, step, output) -> list[Path]:
    out = reader.require_results(out)
    if kind == "standard":
        if not (out / "summary_by_setting.parquet").exists():
            summaries.write_summaries(out)
        return standard_figures(out)
    if kind not in FIGURE_KINDS:
        raise plots.PlotError(f"{kind!r}: not a kind of figure; kinds are {', '.join(FIGURE_KINDS)}")
    t = reader.Results(out)
    if kind == "heatmap":
        missing = [f"--{n}" for n, v in (("x", x), ("y", y), ("value", value)) if v is None]
        if missing:
            raise plots.PlotError(f"heatmap needs {', '.join(missing)}")
        if "summary_by_setting" not in t:
            t["summary_by_setting"] = summaries.write_summaries(out)[1]
        path = Path(output or out / "figures" / f"heatmap_{value}_{x}_{y}.png")
        return [plots.heatmap(t["summary_by_setting"], x, y, value, path, facet, runs=t["runs"])]
    where = where or {}
    runs = t["runs"]
    ids = select_runs(runs, where, run_id)
    label = selection_label(runs, ids, where, run_id)
    tag = "_".join(f"{k}-{v}" for k, v in where.items()) or (f"run{run_id}" if run_id is not None else "all")
    if kind == "density":
        path = Path(output or out / "figures" / f"density_{tag}.png")
        return [plots.density_map(t["density"], ids, path, value or "max_err", title=label)]
    step = step if step is not None else int(t["metrics"]["step"].max())
    path = Path(output or out / "figures" / f"reliability_{tag}_step{step}.png")
    return [plots.reliability(t["calibration"], ids, step, path, title=f"{label}, step {step}")]


def selection_label(runs: pd.DataFrame, ids, where: dict, run_id: int | None) -> str:
    """The title of a figure of selected runs: one run by its settings, or the selection and what
    it pools over."""
    if run_id is not None:
        row = runs.loc[runs["run_id"] == run_id].iloc[0]
        shown = [c for c in ["case", *summaries.swept_columns(runs), "seed"] if c in row]
        return f"run {run_id} (" + ", ".join(f"{c}={plots.fmt(row[c])}" for c in shown) + ")"
    label = ", ".join(f"{k}={v}" for k, v in where.items()) or "all runs"
    pooled = pooled_axes(runs, ids)
    return f"{label}; {pooled}" if pooled else label


# ---------------------------------------------------------------- selecting runs


def select_runs(runs: pd.DataFrame, where: dict | None = None, run_id: int | None = None) -> pd.Series:
    """run_ids matching setting=value pairs (floats compared with a tolerance), or one run_id."""
    if run_id is not None:
        if run_id not in set(runs["run_id"]):
            raise plots.PlotError(f"--run-id {run_id}: no such run (0 to {runs['run_id'].max()})")
        return pd.Series([run_id])
    mask = np.ones(len(runs), bool)
    for key, value in (where or {}).items():
        if key not in runs.columns:
            raise plots.PlotError(f"--where {key}: no such column in runs.parquet")
        col = runs[key]
        if pd.api.types.is_numeric_dtype(col):
            try:
                x = float(value)
            except ValueError:
                raise plots.PlotError(f"--where {key}={value}: expected a number; {_values_of(key, col)}") from None
            match = nearest_value(col.to_numpy(float), x)
            if match is None:
                raise plots.PlotError(f"--where {key}={value}: no run matches; {_values_of(key, col)}")
            mask &= col.to_numpy(float) == match
        else:
            if not (col.astype(str) == str(value)).any():
                raise plots.PlotError(f"--where {key}={value}: no run matches; {_values_of(key, col)}")
            mask &= (col.astype(str) == str(value)).to_numpy()
    if not mask.any():
        raise plots.PlotError(f"--where {where}: no run matches all of these together")
    return runs.loc[mask, "run_id"]


def pooled_axes(runs: pd.DataFrame, run_ids) -> str:
    """'pooled over sigma1 (6 values), seeds': the grid axes and cases left free by a selection."""
    sel = runs[runs["run_id"].isin(run_ids)]
    free = plots.varying(sel, ["case", *summaries.swept_columns(runs)])
    free += ["seeds"] if sel["seed"].nunique() > 1 else []
    return f"pooled over {', '.join(free)}" if free else ""


def nearest_value(values: np.ndarray, x: float) -> float | None:
    """The existing value nearest x if x lies within half the spacing to its neighbours (a tick
    label such as 2.3 for 2.3125 picks it), else None; infinite values match only themselves."""
    v = np.unique(values[~np.isnan(values)])
    if np.isinf(x) or not len(v):
        return x if x in v else None
    finite = v[np.isfinite(v)]
    if not len(finite):
        return None
    i = int(np.argmin(np.abs(finite - x)))
    if np.isclose(finite[i], x, rtol=1e-6, atol=0.0):
        return float(finite[i])
    gaps = np.diff(finite)
    half = 0.5 * min(
        [g for g in (gaps[i - 1] if i > 0 else None, gaps[i] if i < len(gaps) else None) if g is not None], default=0.0
    )
    return float(finite[i]) if abs(finite[i] - x) < half else None


def _values_of(key: str, col: pd.Series, shown: int = 20) -> str:
    """'KEY takes v1, v2, ...': the values a runs column has (at most ``shown`` of them)."""
    values = sorted(col.dropna().unique())
    text = ", ".join(map(plots.fmt, values[:shown]))
    return f"{key} takes {text}" + (f" ... ({len(values)} values)" if len(values) > shown else "")
