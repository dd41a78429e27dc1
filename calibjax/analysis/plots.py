"""Figures drawn from the result files alone (never by retraining, never from the sweep file).

Each function takes tables (pandas) and a path; ``calibjax.analysis.figures`` chooses which to
draw for a results directory. Figures are ``matplotlib.figure.Figure`` objects rendered straight to PNG, so
drawing them changes no global matplotlib state (no pyplot, no backend switch).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import matplotlib
import matplotlib.colors
import matplotlib.patches
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from calibjax import sweep as sweep_mod
from calibjax.analysis import summaries
from calibjax.core import tasks
from calibjax.errors import CalibjaxError
from calibjax.storage import files

BAND = (0.0, 1.0)  # quantiles of the seed band: min to max over seeds


def _subplots(ncols: int, figsize, **kw):
    """A new figure of one row of ncols panels (axes as a 1 x ncols array unless squeeze)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, **kw)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    return path


def densities(runs: pd.DataFrame, path: Path) -> Path:
    """Per case (1-D tasks): each class's P(c) p(x|c) and the mixture p(x)."""
    cases = runs[runs["dim"] == 1].drop_duplicates("case")
    fig, axes = _subplots(len(cases), figsize=(4.2 * len(cases), 3.2), squeeze=False)
    for ax, (_, row) in zip(axes[0], cases.iterrows(), strict=True):
        task = sweep_mod.task_from_row(row)
        lo, hi = (float(a[0]) for a in tasks.support_range(task, 4.0))
        x = np.linspace(lo, hi, 400, dtype=np.float32)[:, None]
        lj = np.exp(np.asarray(jax.vmap(tasks.log_joint, (None, 0))(task, x)))
        for c in range(lj.shape[1]):
            ax.plot(x[:, 0], lj[:, c], label=f"P(c{c + 1}) p(x|c{c + 1})")
        ax.plot(x[:, 0], lj.sum(1), "k--", lw=1, label="p(x)")
        ax.set(title=f"{row['case']}: {task_label(row)}", xlabel="x")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density: P(c) p(x|c) and p(x)")
    return _save(fig, path)


def task_label(row) -> str:
    """A 1-D two-class task by its parameters, e.g. 'mu 0, 3; sigma 1, 1' (priors when unequal)."""
    mus = [row[c] for c in row.index if re.fullmatch(r"mu\d+", c)]
    sigmas = [row[c] for c in row.index if re.fullmatch(r"sigma\d+", c)]
    priors = [row[c] for c in row.index if re.fullmatch(r"prior\d+", c)]
    text = f"mu {', '.join(map(fmt, mus))}; sigma {', '.join(map(fmt, sigmas))}"
    return text + (f"; P(c) {', '.join(map(fmt, priors))}" if len(set(priors)) > 1 else "")


def posterior_curves(curves: pd.DataFrame, runs: pd.DataFrame, case: str, steps, path: Path) -> Path:
    """Model posterior (median over seeds, min-max band) against the exact one at a few steps."""
    ids = runs.loc[runs["case"] == case, "run_id"]
    df = curves[curves["run_id"].isin(ids) & curves["step"].isin(steps)]
    fig, axes = _subplots(len(steps), figsize=(4.2 * len(steps), 3.2), squeeze=False, sharey=True)
    for ax, step in zip(axes[0], steps, strict=True):
        d = df[df["step"] == step]
        for c, dc in d.groupby("class"):
            g = dc.groupby("x")
            stats = g["model_prob"].quantile([0.5, *BAND]).unstack()
            (line,) = ax.plot(stats.index, stats[0.5], label=f"model P(c{c}|x)")
            seeds = dc["run_id"].nunique()
            ax.fill_between(
                stats.index,
                stats[BAND[0]],
                stats[BAND[1]],
                color=line.get_color(),
                alpha=0.25,
                label=f"min-max over {seeds} seeds" if c == 1 else None,
            )
            ax.plot(stats.index, g["true_prob"].first(), "--", color="k", lw=1, label="exact" if c == 1 else None)
        ax.set(title=f"{case}: step {step}", xlabel="x", ylim=(-0.02, 1.02))
    axes[0][0].set_ylabel("P(C | x)")
    axes[0][-1].legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        title="lines: median over seeds",
        title_fontsize=7,
    )
    return _save(fig, path)


def kl_vs_steps(metrics: pd.DataFrame, runs: pd.DataFrame, path: Path, by: str = "case", title: str = "") -> Path:
    """kl against steps (log-log), median over the runs of each `by` value with an interquartile band."""
    df = metrics.merge(runs[["run_id", by]], on="run_id")
    df = df[df["step"] > 0]
    fig, ax = _subplots(1, (5.5, 3.8))
    for key, d in df.groupby(by, sort=False):
        q = d.groupby("step")["kl"].quantile([0.25, 0.5, 0.75]).unstack()
        (line,) = ax.plot(q.index, q[0.5], marker="o", ms=3, label=f"{by} {fmt(key)}" if by != "case" else str(key))
        ax.fill_between(q.index, q[0.25], q[0.75], color=line.get_color(), alpha=0.2)
    ax.fill_between([], [], [], color="grey", alpha=0.2, label="interquartile range over runs")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training steps (mini-batch updates)",
        ylabel="E_x KL(P(C|x) || q(C|x))  [nats]",
        title=title,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        title="median over runs",
        title_fontsize=7,
    )
    return _save(fig, path)


def error_by_density(density: pd.DataFrame, runs: pd.DataFrame, path: Path, by: str = "case", x: str = "step") -> Path:
    """max |P - q| per log10-density bin (median over seeds), one panel per `by`, against
    training steps or, at the last checkpoint, against a swept setting ``x`` (e.g. n_data;
    an infinite value, online, is drawn at the right end)."""
    cols = ["run_id", by] + ([x] if x != "step" and x != by else [])
    df = density.merge(runs[cols], on="run_id")
    df = df[(df["step"] > 0) & (df["mass"] > 0)]
    if x != "step":
        df = df[df["step"] == df["step"].max()]
        finite = df.loc[np.isfinite(df[x]), x]
        df = df.assign(**{x: df[x].replace(np.inf, finite.max() * 3.0)})
    keys = list(dict.fromkeys(df[by]))
    fig, axes = _subplots(len(keys), figsize=(4.4 * len(keys), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys, strict=True):
        d = df[df[by] == key]
        med = d.groupby(["log10_density_lo", "log10_density_hi", x])[["max_err", "mass"]].median()
        bins = med.index.droplevel(x).unique()
        cmap = matplotlib.colormaps["viridis"].resampled(len(bins))
        for i, (lo, hi) in enumerate(bins):
            m = med.loc[(lo, hi)]
            ax.plot(
                m.index,
                m["max_err"],
                color=cmap(i),
                marker="o" if x != "step" else None,
                ms=3,
                label=f"({lo:g}, {hi:g}]  mass {m['mass'].iloc[0]:.1e}",
            )
        ax.set(
            xscale="log",
            title=str(key),
            xlabel="training steps"
            if x == "step"
            else f"{x} (at step {int(df['step'].max())}; rightmost point: online)"
            if np.isinf(runs[x]).any()
            else x,
        )
        ax.legend(
            fontsize=6,
            title="log10 p(x) bin",
            title_fontsize=6,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.18),
            ncol=2,
            frameon=False,
        )
    axes[0][0].set_ylabel("max |P - q| in bin (median over seeds)")
    return _save(fig, path)


MAX_PANELS = 6  # per-case figures are drawn when a sweep has at most this many cases


def varying(table: pd.DataFrame, columns) -> list[str]:
    """'sigma1 (6 values)' for each of ``columns`` that takes more than one value in ``table``."""
    return [f"{c} ({n} values)" for c in columns if (n := table[c].nunique(dropna=False)) > 1]


def fmt(v) -> str:
    """A setting's value as a label: numbers short (%g), anything else as it is."""
    return f"{v:g}" if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else str(v)


# ---------------------------------------------------------------- learnability maps

TASK_COLUMN = re.compile(
    r"^(?:(?:mu|sigma)\d+(?:_k\d+)?(?:_d\d+)?|prior\d+|weight\d+_k\d+"
    r"|num_classes|num_components|dim)$"
)


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class PlotError(CalibjaxError):
    """A plot request that the tables cannot answer (unknown column, setting not swept)."""


def _is_log_spaced(values: np.ndarray) -> bool:
    v = np.sort(np.unique(values))
    if len(v) < 3 or v[0] <= 0:
        return False
    r = np.diff(np.log(v))
    return bool(np.allclose(r, r[0], rtol=1e-3) and not np.allclose(np.diff(v), np.diff(v)[0], rtol=1e-3))


def _edges(values: np.ndarray, log: bool) -> np.ndarray:
    v = np.log(values) if log else values.astype(float)
    if len(v) == 1:
        e = np.array([v[0] - 0.5, v[0] + 0.5]) if not log else np.array([v[0] - 0.1, v[0] + 0.1])
    else:
        mid = (v[:-1] + v[1:]) / 2
        e = np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])
    return np.exp(e) if log else e


def pooled_settings(agg: pd.DataFrame, *shown) -> str:
    """The settings of summary_by_setting a heatmap's cells pool (not on an axis or facet), e.g.
    'lr (3 values)'; empty when each cell is one grid point."""
    return ", ".join(varying(agg, [c for c in summaries.setting_columns(agg) if c not in shown]))


def heatmap(
    agg: pd.DataFrame,
    x: str,
    y: str,
    value: str,
    path: Path,
    facet: str | None = None,
    title: str | None = None,
    runs: pd.DataFrame | None = None,
) -> Path:
    """A summary (median over seeds) over two swept settings; 'never' cells hatched grey.

    ``agg`` is summary_by_setting; ``runs`` (optional) tells unswept settings from unknown names.
    """
    _check_heatmap(agg, x, y, value, facet, runs)
    facets = list(dict.fromkeys(agg[facet])) if facet else [None]
    finite = agg[value].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    positive = len(finite) and finite.min() > 0
    log_color = bool(positive and finite.max() / finite.min() > 20)
    norm = (
        matplotlib.colors.LogNorm(finite.min(), finite.max())
        if log_color
        else matplotlib.colors.Normalize(finite.min() if len(finite) else 0, finite.max() if len(finite) else 1)
    )
    fig, axes = _subplots(len(facets), figsize=(4.6 * len(facets) + 1.2, 4.0), squeeze=False)
    xs, ys = np.sort(agg[x].unique()), np.sort(agg[y].unique())
    for ax, fv in zip(axes[0], facets, strict=True):
        d = agg if fv is None else agg[agg[facet] == fv]
        mesh = _heatmap_panel(ax, d, x, y, value, norm, xs, ys)
        panel = (f"{facet} = {fv:g}" if isinstance(fv, float) else f"{facet} = {fv}") if facet else None
        ax.set(
            xlabel=x + (" (log)" if _is_log_spaced(xs) else ""),
            ylabel=y + (" (log)" if _is_log_spaced(ys) else ""),
            title=panel,
        )
    cbar = fig.colorbar(mesh, ax=axes[0].tolist())
    cbar.set_label(value + " (median over seeds)")
    if (np.isposinf(agg[value].to_numpy(float))).any():
        axes[0][0].legend(
            handles=[
                matplotlib.patches.Patch(facecolor="#d9d9d9", hatch="///", edgecolor="#888888", label="never reached")
            ],
            loc="upper left",
            bbox_to_anchor=(0.0, -0.13),
            fontsize=8,
            frameon=False,
        )
    pooled = pooled_settings(agg, x, y, facet)
    fig.suptitle(title or f"{value}: median over seeds" + (f"; median over {pooled}" if pooled else ""))
    return _save(fig, path)


def _heatmap_panel(ax, d: pd.DataFrame, x: str, y: str, value: str, norm, xs: np.ndarray, ys: np.ndarray):
    """One panel of a heatmap: the medians over (x, y), 'never' cells hatched, ticks thinned."""
    xlog, ylog = _is_log_spaced(xs), _is_log_spaced(ys)
    grid = d.pivot_table(index=y, columns=x, values=value, aggfunc="median", dropna=False)
    grid = grid.reindex(index=ys, columns=xs).to_numpy(float)
    ex, ey = _edges(xs, xlog), _edges(ys, ylog)
    mesh = ax.pcolormesh(ex, ey, np.ma.masked_invalid(grid), norm=norm, cmap="viridis", shading="flat")
    never = np.isposinf(grid)
    if never.any():
        ax.pcolor(
            ex,
            ey,
            np.ma.masked_where(~never, np.ones_like(grid)),
            cmap=matplotlib.colors.ListedColormap(["#d9d9d9"]),
            hatch="///",
            edgecolor="#888888",
            shading="flat",
            linewidth=0,
        )
    for axis, values, log in ((ax.xaxis, xs, xlog), (ax.yaxis, ys, ylog)):
        if log:
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
        shown = values[:: max(1, len(values) // 6)]
        axis.set_ticks(shown, [f"{v:.3g}" for v in shown])
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_minor_locator(matplotlib.ticker.NullLocator())
    return mesh


def _check_heatmap(agg: pd.DataFrame, x: str, y: str, value: str, facet: str | None, runs) -> None:
    """PlotError unless x, y (and facet) are swept settings and value a summary column: saying
    whether a name is unknown, set per case, or not swept, and what the choices are."""
    for name, col in (("--x", x), ("--y", y), ("--value", value), ("--facet", facet)):
        if col is not None and col not in agg.columns:
            if runs is not None and col in runs.columns:
                swept = summaries.swept_columns(runs)
                axes = f"grid axes: {', '.join(swept)}" if swept else "this sweep has no grid axes"
                if runs[col].nunique() > 1:
                    first = runs.groupby("case", sort=False)[col].first()
                    per_case = ", ".join(f"{c} {fmt(v)}" for c, v in first.items())
                    raise PlotError(
                        f"{name} {col}: set per case ({per_case}), not a grid axis; a heatmap needs "
                        f"two grid axes; {axes}"
                    )
                raise PlotError(f"{name} {col}: this setting was not swept (one value: {runs[col].iloc[0]}); {axes}")
            raise PlotError(
                f"{name} {col}: no such column; settings: "
                f"{', '.join(c for c in agg.columns if c in (runs.columns if runs is not None else []))}"
                f"; summaries: {', '.join(c for c in summaries.value_columns(agg) if '_q' not in c)}"
            )
    for name, col in (("--x", x), ("--y", y), ("--facet", facet)):
        if col is not None and agg[col].nunique() < 2:
            raise PlotError(f"{name} {col}: this setting was not swept (one value: {agg[col].iloc[0]})")


def density_map(density: pd.DataFrame, run_ids, path: Path, value: str = "max_err", title: str = "") -> Path:
    """Error per log10-density bin (rows) against checkpoint steps (columns), median over the runs."""
    if value not in density.columns:
        raise PlotError(f"--value {value}: density.parquet has {', '.join(density.columns[4:])}")
    d = density[density["run_id"].isin(run_ids) & (density["step"] > 0) & (density["mass"] > 0)]
    if d.empty:
        raise PlotError("no density rows for the selected runs")
    med = d.groupby(["log10_density_hi", "step"])[[value, "mass"]].median()
    grid = med[value].unstack("step")
    mass = med["mass"].groupby(level=0).first()
    fig, ax = _subplots(1, (6.4, 3.8))
    norm = matplotlib.colors.LogNorm(max(np.nanmin(grid.to_numpy()), 1e-6), max(np.nanmax(grid.to_numpy()), 1e-5))
    im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="magma", norm=norm)
    ax.set_xticks(range(grid.shape[1]), [f"{s:g}" for s in grid.columns], rotation=45)
    ax.set_yticks(range(grid.shape[0]), [f"<= {hi:g}  (mass {mass[hi]:.0e})" for hi in grid.index], fontsize=7)
    ax.set(xlabel="training steps", ylabel="log10 p(x) bin", title=title)
    fig.colorbar(im, ax=ax, label=f"{value} in bin (median over runs)")
    return _save(fig, path)


def reliability(calibration: pd.DataFrame, run_ids, step: int, path: Path, title: str = "") -> Path:
    """Reliability diagram: the usual estimate from a labelled sample beside the true curve."""
    d = calibration[calibration["run_id"].isin(run_ids) & (calibration["step"] == step)]
    if d.empty:
        steps = sorted(calibration.loc[calibration["run_id"].isin(run_ids), "step"].unique())
        raise PlotError(
            f"--step {step}: not a checkpoint of the selected runs; checkpoints: {', '.join(map(str, steps)) or 'none'}"
        )
    g = d.groupby("conf_lo").agg(
        est_count=("est_count", "sum"),
        est_acc=("est_acc", "median"),
        est_conf=("est_conf", "median"),
        true_mass=("true_mass", "mean"),
        true_acc=("true_acc", "median"),
        true_conf=("true_conf", "median"),
    )
    fig, ax = _subplots(1, (4.6, 4.4))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    est = g[g["est_count"] > 0]
    runs = d["run_id"].nunique()
    ax.plot(
        est["est_conf"],
        est["est_acc"],
        "o-",
        ms=4,
        label=f"estimated: labelled samples of {runs} run(s) pooled\n(numbers: examples in the bin)",
    )
    for _, row in est.iterrows():
        ax.annotate(
            f"{row['est_count']:.0f}",
            (row["est_conf"], row["est_acc"]),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize=6,
            color="C0",
        )
    tru = g[g["true_mass"] > 0]
    ax.plot(tru["true_conf"], tru["true_acc"], "s--", ms=4, label="true (exact posterior; median over runs)")
    seen = pd.concat([est["est_conf"], tru["true_conf"]])
    lo = float(np.floor(seen.min() * 20) / 20) if len(seen) else 0.0
    ax.set(
        xlim=(lo, 1), ylim=(lo, 1), xlabel="confidence max_c q(c|x)", ylabel="accuracy", title=title or f"step {step}"
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


CLASS_COLORS = np.array(
    [
        [0.12, 0.47, 0.71],
        [1.0, 0.5, 0.05],
        [0.17, 0.63, 0.17],
        [0.84, 0.15, 0.16],
        [0.58, 0.4, 0.74],
        [0.55, 0.34, 0.29],
    ]
)


def posterior_map(curves: pd.DataFrame, runs: pd.DataFrame, case: str, steps, path: Path) -> Path:
    """2-D tasks: the exact posterior and the learned one (median over seeds, renormalised) as
    class-colour mixtures, sum_c P(c|x) colour_c, with the decision boundary of each drawn on top."""
    ids = runs.loc[runs["case"] == case, "run_id"]
    d = curves[curves["run_id"].isin(ids)]
    m = int(d["class"].max())
    colors = CLASS_COLORS[np.arange(m) % len(CLASS_COLORS)]

    def image(table, column):
        g = table.groupby(["x2", "x", "class"])[column].median().unstack("class")
        xs, ys = np.sort(table["x"].unique()), np.sort(table["x2"].unique())
        prob = g.to_numpy().reshape(len(ys), len(xs), m)
        prob = prob / prob.sum(-1, keepdims=True)
        return xs, ys, prob

    first = d[d["step"] == d["step"].min()]
    panels = [("exact P(C|x)", image(first, "true_prob"))]
    panels += [(f"model, step {s}", image(d[d["step"] == s], "model_prob")) for s in steps]
    fig, axes = _subplots(len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (title, (xs, ys, prob)) in zip(axes[0], panels, strict=True):
        ax.imshow(
            np.clip(prob @ colors, 0, 1),
            origin="lower",
            extent=(xs[0], xs[-1], ys[0], ys[-1]),
            aspect="auto",
            interpolation="bilinear",
        )
        label = prob.argmax(-1)
        for c in range(m):  # each class's region outlined once: shared borders overlap exactly
            if (label == c).any() and not (label == c).all():
                ax.contour(xs, ys, (label == c).astype(float), levels=[0.5], colors="k", linewidths=0.6)
        ax.set(title=f"{case}: {title}", xlabel="x1")
    axes[0][0].set_ylabel("x2")
    handles = [matplotlib.patches.Patch(color=colors[c], label=f"class {c + 1}") for c in range(m)]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    return _save(fig, path)


def summary_lines(agg: pd.DataFrame, x: str, value: str, path: Path, hue: str = "case") -> Path:
    """A summary against one swept setting, median with interquartile band, one line per `hue`.

    An infinite x (n_data = online) is drawn at the right end and labelled."""
    for name, col in (("x", x), ("value", value), ("hue", hue)):
        if col not in agg.columns:
            raise PlotError(f"{name} {col}: no such column")
    fig, ax = _subplots(1, (5.6, 3.8))
    xs = np.sort(agg[x].unique())
    finite = xs[np.isfinite(xs)]
    log = _is_log_spaced(finite) or (finite.min() > 0 and finite.max() / finite.min() > 100)
    inf_at = finite.max() * (3.0 if log else 1.1) if len(finite) < len(xs) else None
    for key, d in agg.groupby(hue, sort=False):
        d = d.sort_values(x)
        px = np.where(np.isinf(d[x]), inf_at if inf_at else np.nan, d[x])
        (line,) = ax.plot(px, d[value], marker="o", ms=3, label=str(key))
        if f"{value}_q25" in d:
            ax.fill_between(px, d[f"{value}_q25"], d[f"{value}_q75"], color=line.get_color(), alpha=0.2)
    if log:
        ax.set_xscale("log")
    if inf_at:
        ticks = list(ax.get_xticks())
        ax.axvline(inf_at / (1.7 if log else 1.05), color="k", lw=0.5, ls=":")
        ax.set_xticks(
            [t for t in ticks if finite.min() <= t <= finite.max()] + [inf_at],
            [f"{t:g}" for t in ticks if finite.min() <= t <= finite.max()] + ["online"],
        )
    ax.set(yscale="log", xlabel=x, ylabel=value + " (median, IQR over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- the estimator benchmark

ESTIMATOR_STYLE = {
    "ece_width": ("C0", "o"),
    "ece_mass": ("C1", "s"),
    "ece_sweep": ("C2", "^"),
    "ece_l2_debiased": ("C3", "v"),
    "smece": ("C4", "D"),
    "ece_classwise": ("C5", "x"),
}


def estimator_benchmark(bench: pd.DataFrame, path: Path, steps=None) -> Path:
    """Bias (top) and RMSE (bottom) of each calibration estimator against its exact target, over
    labelled-sample size; one column per checkpoint (training stage), up to four. Every run and
    independent sample of the sweep at that checkpoint is pooled (``summaries.estimator_benchmark``);
    the dashed line is the median true ECE there: an RMSE above it is larger than what it measures."""
    all_steps = sorted(bench["step"].unique())
    steps = (
        list(steps)
        if steps is not None
        else (
            all_steps
            if len(all_steps) <= 4
            else [all_steps[0], all_steps[len(all_steps) // 3], all_steps[2 * len(all_steps) // 3], all_steps[-1]]
        )
    )
    fig = Figure(figsize=(3.3 * len(steps) + 1.6, 6.2))
    axes = fig.subplots(2, len(steps), squeeze=False, sharex=True, sharey="row")
    for j, step in enumerate(steps):
        at = bench[bench["step"] == step]
        for name, d in at.groupby("estimator", sort=False):
            d = d.sort_values("n")
            color, marker = ESTIMATOR_STYLE.get(name, ("k", "."))
            axes[0, j].plot(d["n"], d["bias"], color=color, marker=marker, ms=4, label=name)
            axes[1, j].plot(d["n"], d["rmse"], color=color, marker=marker, ms=4, label=name)
        truth = at.loc[at["estimator"].isin(["ece_width", "ece_mass", "ece_sweep"]), "target"].median()
        axes[0, j].set_title(f"step {step}: true ECE {truth:.2g}", fontsize=9)
        axes[0, j].axhline(0.0, color="k", lw=0.6)
        axes[1, j].axhline(truth, color="k", lw=0.8, ls="--")
        axes[1, j].set_xlabel("labelled examples n")
    for ax in axes.ravel():
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_yscale("symlog", linthresh=1e-3)
    axes[1, 0].set_yscale("log")
    axes[0, 0].set_ylabel("bias: mean(estimate - exact)\n(over runs and samples)")
    axes[1, 0].set_ylabel("RMSE (dashed: true ECE)")
    axes[1, -1].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


# ---------------------------------------------------------------- losses


def loss_comparison(summary: pd.DataFrame, path: Path, by: str = "case") -> Path:
    """Per training-loss variant (``by``, one row of markers each): the final kl to the posterior
    (measured), the kl of the loss's own population optimum (predicted: a perfectly trained network
    keeps it) and, where measured, the final kl after temperature scaling; medians over seeds, one
    panel per task (grid point of the task entries)."""
    tasks_cols = [c for c in summaries.swept_columns(summary) if TASK_COLUMN.match(c)]
    panels = list(summary.groupby(tasks_cols, sort=True)) if tasks_cols else [((), summary)]
    fig, axes = _subplots(
        len(panels),
        (3.0 * len(panels) + 1.5, 0.32 * summary[by].nunique() + 2.2),
        squeeze=False,
        sharey=True,
        sharex=True,
    )
    labels = list(dict.fromkeys(summary[by]))
    floor = 1e-6  # kl_optimum is 0 for proper losses: drawn at the axis floor
    for ax, (key, d) in zip(axes[0], panels, strict=True):
        med = d.groupby(by)[[c for c in ("final_kl", "final_kl_optimum", "final_kl_ts") if c in d]].median()
        y = np.arange(len(labels))
        med = med.reindex(labels)
        ax.scatter(
            np.maximum(med["final_kl_optimum"], floor),
            y,
            marker="|",
            s=160,
            color="k",
            label="predicted: kl of the loss's optimum (0, a proper loss, at the left edge)",
        )
        ax.scatter(med["final_kl"], y, marker="o", color="C0", label="trained")
        if "final_kl_ts" in med:
            ax.scatter(med["final_kl_ts"], y, marker="x", color="C3", label="trained, temperature-scaled")
        ax.set(xscale="log", yticks=y, yticklabels=labels, xlabel="final kl to P(C|x)  [nats]")
        ax.invert_yaxis()
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(", ".join(f"{c}={v:g}" for c, v in zip(tasks_cols, key, strict=True)) or "all runs", fontsize=9)
        ax.grid(True, which="both", axis="x", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("final kl (median over seeds and the last 10 % of training)", fontsize=10)
    return _save(fig, path)
