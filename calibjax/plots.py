"""Figures drawn from the result tables alone (never by retraining).

Each function takes tables (pandas) and a path; ``standard_figures`` draws
the default set for a results directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from calibjax import store, sweep as sweep_mod, tasks  # noqa: E402

BAND = (0.0, 1.0)  # quantiles of the seed band: min to max over seeds


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def densities(runs: pd.DataFrame, path: Path) -> Path:
    """Per case (1-D tasks): each class's P(c) p(x|c) and the mixture p(x)."""
    cases = runs[runs["dim"] == 1].drop_duplicates("case")
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.2), squeeze=False)
    for ax, (_, row) in zip(axes[0], cases.iterrows()):
        task = sweep_mod.task_from_row(row)
        lo, hi = (float(a[0]) for a in tasks.support_range(task, 4.0))
        x = np.linspace(lo, hi, 400, dtype=np.float32)[:, None]
        lj = np.exp(np.array([tasks.log_joint(task, xi) for xi in x]))
        for c in range(lj.shape[1]):
            ax.plot(x[:, 0], lj[:, c], label=f"P(c{c + 1}) p(x|c{c + 1})")
        ax.plot(x[:, 0], lj.sum(1), "k--", lw=1, label="p(x)")
        ax.set(title=row["case"], xlabel="x")
        ax.legend(fontsize=7)
    return _save(fig, path)


def posterior_curves(curves: pd.DataFrame, runs: pd.DataFrame, case: str, steps, path: Path) -> Path:
    """Model posterior (median over seeds, min-max band) against the exact one at a few steps."""
    ids = runs.loc[runs["case"] == case, "run_id"]
    df = curves[curves["run_id"].isin(ids) & curves["step"].isin(steps)]
    fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 3.2), squeeze=False, sharey=True)
    for ax, step in zip(axes[0], steps):
        d = df[df["step"] == step]
        for c, dc in d.groupby("class"):
            g = dc.groupby("x")
            stats = g["model_prob"].quantile([0.5, *BAND]).unstack()
            line, = ax.plot(stats.index, stats[0.5], label=f"model P(c{c}|x)")
            ax.fill_between(stats.index, stats[BAND[0]], stats[BAND[1]], color=line.get_color(), alpha=0.25)
            ax.plot(stats.index, g["true_prob"].first(), "--", color="k", lw=1,
                    label="exact" if c == 1 else None)
        ax.set(title=f"{case}: step {step}", xlabel="x", ylim=(-0.02, 1.02))
    axes[0][0].set_ylabel("P(C | x)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def kl_vs_steps(metrics: pd.DataFrame, runs: pd.DataFrame, path: Path, by: str = "case") -> Path:
    """kl against steps (log-log), median over seeds with an interquartile band, one line per `by`."""
    df = metrics.merge(runs[["run_id", by]], on="run_id")
    df = df[df["step"] > 0]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, d in df.groupby(by, sort=False):
        q = d.groupby("step")["kl"].quantile([0.25, 0.5, 0.75]).unstack()
        line, = ax.plot(q.index, q[0.5], marker="o", ms=3, label=str(key))
        ax.fill_between(q.index, q[0.25], q[0.75], color=line.get_color(), alpha=0.2)
    ax.set(xscale="log", yscale="log", xlabel="training steps (mini-batch updates)",
           ylabel="E_x KL(P(C|x) || q(C|x))  [nats]")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def error_by_density(density: pd.DataFrame, runs: pd.DataFrame, path: Path, by: str = "case") -> Path:
    """max |P - q| per log10-density bin against steps (median over seeds), one panel per `by`."""
    df = density.merge(runs[["run_id", by]], on="run_id")
    df = df[(df["step"] > 0) & (df["mass"] > 0)]
    keys = list(dict.fromkeys(df[by]))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        d = df[df[by] == key]
        med = d.groupby(["log10_density_lo", "log10_density_hi", "step"])[["max_err", "mass"]].median()
        bins = med.index.droplevel("step").unique()
        cmap = plt.get_cmap("viridis", len(bins))
        for i, (lo, hi) in enumerate(bins):
            m = med.loc[(lo, hi)]
            ax.plot(m.index, m["max_err"], color=cmap(i),
                    label=f"({lo:g}, {hi:g}]  mass {m['mass'].iloc[0]:.1e}")
        ax.set(xscale="log", title=str(key), xlabel="training steps")
        ax.legend(fontsize=6, title="log10 p(x) bin", title_fontsize=6)
    axes[0][0].set_ylabel("max |P - q| in bin (median over seeds)")
    return _save(fig, path)


def standard_figures(out: str | Path) -> list[Path]:
    """The default figures of a results directory, from its tables and manifest."""
    out = Path(out)
    t = store.load_results(out)
    runs, figs = t["runs"], []
    fig_dir = out / "figures"
    if (runs["dim"] == 1).any():
        figs.append(densities(runs, fig_dir / "densities.png"))
    figs.append(kl_vs_steps(t["metrics"], runs, fig_dir / "kl_vs_steps.png"))
    figs.append(error_by_density(t["density"], runs, fig_dir / "error_by_density.png"))
    if "curves" in t:
        manifest = store.read_manifest(out)
        sw = sweep_mod.parse(tomllib.loads(manifest["sweep_text"]), manifest["sweep_file"])
        plot_steps = {r.case: r.settings["plot_steps"] for r in sw.runs}
        for case in runs.loc[runs["run_id"].isin(t["curves"]["run_id"].unique()), "case"].unique():
            figs.append(posterior_curves(t["curves"], runs, case, plot_steps[case],
                                         fig_dir / f"posterior_{case}.png"))
    return figs
