"""The density law: how the steps a network needs to learn the posterior in a region scale with the
data density there.

In the kernel (wide-network, small-step) regime the time to fit a function at x scales as 1/p(x)
(Basri et al., ICML 2020): the steps until the error in a density bin falls below eps go as
p_b^-k with k near 1. From density.parquet:

- per run and density bin (``bin_times``): the steps until the bin's ``kl_mean`` and ``max_err``
  first fall to each threshold (``steps_to``) and after which they stay there (``sustained``),
  interpolated on log-log axes between checkpoints as the summaries' steps_to_ columns are;
- per grid point (``fit_law``): k, minus the least-squares slope of log10(median over seeds of
  those steps) against the bin's log10 density (the middle of its interval), over the bins with
  finite edges whose median says when the bin was learned: reached (not "never"), and not already
  at the first checkpoint for most seeds (that says only "sooner"); a LEVEL interval from
  resampling the seeds (BOOTSTRAP resamples, the same fit on the same bins), R² and the bins used.
  Fewer than MIN_BINS such bins: NaN.

``summaries.write_summaries`` writes them as ``density_times.parquet`` and ``density_law.parquet``
beside the summaries (``stage``), for sweeps of at most MAX_RUNS runs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax.analysis import summaries
from calibjax.core import portable
from calibjax.storage import files, reader

# Thresholds per metric: kl_mean in nats (the summaries' kl thresholds), max_err in probability.
THRESHOLDS = {"kl_mean": summaries.DEFAULT_EPS, "max_err": (0.1, 0.05)}
KINDS = {"steps_to": summaries.steps_to_reach, "sustained": summaries.steps_to_stay}
BOOTSTRAP = 200
LEVEL = 0.9
MIN_BINS = 3
MAX_RUNS = 100_000  # (the per-bin table grows with runs x bins x checkpoints: larger sweeps skip it)
_NEVER = 1e300  # stands in for inf inside medians
LN10 = 2.302585092994046  # ln 10, correctly rounded
LAW_COLUMNS = ("metric", "eps", "kind", "k", "k_lo", "k_hi", "r2", "n_bins", "bins", "n_runs")  # after the grid point


def bin_times(density: pd.DataFrame, thresholds: dict | None = None) -> pd.DataFrame:
    """Per run, density bin with finite edges, metric and threshold: ``steps_to`` and ``sustained``
    (inf: never; NaN: the bin's error is NaN at a checkpoint, e.g. an empty bin or a diverged run),
    the bin's ``log10_density`` (its interval's middle) and ``at_first`` (below eps at the first
    checkpoint already)."""
    d = density[np.isfinite(density["log10_density_lo"]) & np.isfinite(density["log10_density_hi"])]
    d = d.sort_values(["run_id", "log10_density_lo", "step"], kind="stable")
    steps = np.unique(d["step"].to_numpy()).astype(float)
    keys = d[["run_id", "log10_density_lo", "log10_density_hi"]].iloc[:: max(len(steps), 1)].reset_index(drop=True)
    if len(d) != len(keys) * len(steps):
        raise ValueError("density table: every run and bin needs one row at every checkpoint")
    keys.insert(3, "log10_density", (keys["log10_density_lo"] + keys["log10_density_hi"]) / 2)
    parts = []
    for metric, eps_list in (thresholds or THRESHOLDS).items():
        values = d[metric].to_numpy(float).reshape(len(keys), len(steps))
        for eps in eps_list:
            found = {kind: fn(steps, values, eps) for kind, fn in KINDS.items()}
            parts.append(keys.assign(metric=metric, eps=float(eps), **found, at_first=values[:, 0] <= eps))
    return pd.concat(parts, ignore_index=True)


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis, bin by bin in order: numpy's reductions add in an order that depends
    on the CPU's vector width (AVX2 against AVX-512), elementwise additions do not."""
    total = np.zeros(a.shape[:-1])
    for j in range(a.shape[-1]):
        total = total + a[..., j]
    return total


def _log10(x: np.ndarray) -> np.ndarray:
    return portable.log(x) / LN10


def _fit(logp: np.ndarray, logt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (B, bins) arrays of log10 steps (NaN: bin not used): k = -slope of the
    least-squares line against logp, and its R² (NaN with fewer than MIN_BINS bins). Its bits do
    not depend on the CPU (``_sum``, ``portable``)."""
    ok = ~np.isnan(logt)
    n = _sum(ok.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        dp = np.where(ok, logp - (_sum(np.where(ok, logp, 0.0)) / n)[:, None], 0.0)
        dt = np.where(ok, logt - (_sum(np.where(ok, logt, 0.0)) / n)[:, None], 0.0)
        sxx, sxy, syy = _sum(dp * dp), _sum(dp * dt), _sum(dt * dt)
        k, r2 = -sxy / sxx, np.where(syy > 0, sxy * sxy / (sxx * syy), 1.0)
    bad = (n < MIN_BINS) | ~(sxx > 0)
    return np.where(bad, math.nan, k), np.where(bad, math.nan, r2)


def _median_log_steps(v: np.ndarray) -> np.ndarray:
    """log10 of the median over the run axis (-2) of steps, NaN ignored (np.nanmedian's value, by
    one sort: NaN sorts last); never (inf) stays never, and both give NaN here."""
    v = np.sort(np.where(np.isinf(v), _NEVER, v), axis=-2)
    n = (~np.isnan(v)).sum(axis=-2, keepdims=True)
    lo = np.take_along_axis(v, np.maximum((n - 1) // 2, 0), axis=-2)
    hi = np.take_along_axis(v, np.maximum(n // 2, 0), axis=-2)
    m = np.where(n == 0, math.nan, (lo + hi) / 2).squeeze(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((m < _NEVER / 10) & (m > 0), _log10(np.where(m > 0, m, 1.0)), math.nan)


def fit_law(times: pd.DataFrame, runs: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per grid point (case and grid axes, as summary_by_setting), metric, threshold and kind: k
    (steps ∝ p^-k), its LEVEL interval over seeds (k_lo, k_hi), r2, the bins used and n_runs.

    Every grid point at once: the times as a (points, runs, bins) array (NaN past a point's own
    runs); resample i of a point with n runs takes run floor(u[i, j] * n) for j < n, one uniform
    draw u shared by all points (so a point's interval does not depend on the others)."""
    by = ["case", *summaries.swept_columns(runs)]
    t = times.merge(runs[["run_id", *by]], on="run_id")
    # A point is a grid point (numbered as summary_by_setting's) and a (metric, eps) in the order the
    # times list them (bin_times: THRESHOLDS'): no sort of the string columns, whose order came out
    # otherwise under QEMU's Haswell (make test-qemu).
    settings = t.groupby(by, sort=True, dropna=False)
    f, families = pd.factorize(pd.MultiIndex.from_arrays([t["metric"], t["eps"]]))
    g = settings.ngroup().to_numpy() * len(families) + f
    keys = settings.size().index.to_frame(index=False).loc[lambda k: k.index.repeat(len(families))]
    keys = keys.reset_index(drop=True).assign(
        metric=[m for m, _ in families] * settings.ngroups, eps=[e for _, e in families] * settings.ngroups
    )
    bins, b = np.unique(t["log10_density"].to_numpy(), return_inverse=True)
    pos = t.groupby(g)["run_id"].rank(method="dense").to_numpy().astype(np.int64) - 1
    n = np.zeros(len(keys), np.int64)  # runs per point
    np.maximum.at(n, g, pos + 1)
    shape = (len(keys), int(n.max(initial=1)), len(bins))
    cube = {}
    for name in (*KINDS, "at_first"):
        cube[name] = np.full(shape, math.nan)
        cube[name][g, pos, b] = t[name].to_numpy(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (a bin no run has: NaN)
        early = np.nanmean(cube.pop("at_first"), axis=1) > 0.5  # most seeds learned it before looking
    u = np.random.default_rng(seed).random((BOOTSTRAP, shape[1]))
    parts = []
    for kind, v in cube.items():
        logt = np.where(early, math.nan, _median_log_steps(v))
        k, r2 = _fit(np.broadcast_to(bins, logt.shape), logt)
        lo, hi = _interval(v, n, logt, bins, u)
        used = [" ".join(f"{x:g}" for x in bins[~np.isnan(row)]) for row in logt]
        parts.append(
            keys.assign(
                kind=kind, k=k, k_lo=lo, k_hi=hi, r2=r2, n_bins=(~np.isnan(logt)).sum(axis=1), bins=used, n_runs=n
            )
        )
    # point by point, then kind (written out: a stable argsort gave another order under QEMU's Haswell)
    order = (np.arange(len(parts))[None, :] * len(keys) + np.arange(len(keys))[:, None]).ravel()
    return pd.concat(parts, ignore_index=True).iloc[order].reset_index(drop=True)


BLOCK = 4_000_000  # resampled times held at once (points x BOOTSTRAP x runs x bins)


def _interval(v: np.ndarray, n: np.ndarray, logt: np.ndarray, bins: np.ndarray, u: np.ndarray):
    """The LEVEL interval of k per point from BOOTSTRAP resamples of its runs (fit on the same bins)."""
    lo, hi = np.full(len(v), math.nan), np.full(len(v), math.nan)
    step = max(1, BLOCK // max(u.size * v.shape[2], 1))
    j = np.arange(v.shape[1])
    for start in range(0, len(v), step):
        s = slice(start, start + step)
        idx = np.floor(u[None] * n[s, None, None]).astype(np.int64)  # points x resamples x runs
        sample = v[np.arange(len(v))[s, None, None], idx]  # points x resamples x runs x bins
        sample = np.where(j[None, None, :, None] >= n[s, None, None, None], math.nan, sample)  # its own n draws
        med = np.where(np.isnan(logt[s])[:, None], math.nan, _median_log_steps(sample))
        k, _ = _fit(np.broadcast_to(bins, med.shape).reshape(-1, len(bins)), med.reshape(-1, len(bins)))
        k = k.reshape(med.shape[:2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (no resample with a slope: NaN)
            lo[s], hi[s] = np.nanquantile(k, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=1)
    return lo, hi


def stage(out: Path, runs: pd.DataFrame, generation: str | None, staged: files.Staged) -> pd.DataFrame | None:
    """Write density_times.parquet and density_law.parquet of a results directory into ``staged``
    (``summaries.write_summaries``' set); where it has no density table or more than MAX_RUNS runs,
    remove earlier ones instead and return None."""
    paths = [Path(out) / "density_times.parquet", Path(out) / "density_law.parquet"]
    if not (Path(out) / "density.parquet").exists() or len(runs) > MAX_RUNS:
        staged.removed.extend(paths)
        return None
    columns = ["run_id", "step", "log10_density_lo", "log10_density_hi", *THRESHOLDS]
    times = bin_times(reader.read_table(out, "density", columns=columns))
    law = fit_law(times, runs)
    for path, table in zip(paths, (times, law), strict=True):
        files.write_parquet(path, table, generation=generation, staged=staged)
    return law


def figure(times: pd.DataFrame, law: pd.DataFrame, runs: pd.DataFrame, path: Path, metric: str = "kl_mean") -> Path:
    """Steps until each bin's ``metric`` first reaches the first threshold (median over seeds)
    against the bin's density, log-log, per grid point (the first plots.MAX_PANELS): the bins the
    fit used (filled) and the others (hollow), the fitted line with k and its interval, and the
    slope k = 1 of the kernel regime through the same centre."""
    from calibjax.analysis import plots  # (matplotlib: loaded only to draw)

    eps = THRESHOLDS[metric][0]
    chosen = law[(law["metric"] == metric) & (law["eps"] == eps) & (law["kind"] == "steps_to")]
    chosen = chosen.head(plots.MAX_PANELS)
    by = [c for c in chosen.columns if c not in LAW_COLUMNS]
    t = times[(times["metric"] == metric) & (times["eps"] == eps)].merge(runs[["run_id", *by]], on="run_id")
    fig, axes = plots._subplots(len(chosen), figsize=(3.6 * len(chosen), 3.2), squeeze=False)
    for ax, (_, row) in zip(axes[0], chosen.iterrows(), strict=True):
        g = t[np.logical_and.reduce([t[c] == row[c] for c in by])] if by else t
        med = g.groupby("log10_density")["steps_to"].median()
        used = np.isin(med.index.to_numpy(), [float(b) for b in row["bins"].split()])
        shown = np.isfinite(med.to_numpy())
        p = 10.0 ** med.index.to_numpy()
        ax.loglog(p[used & shown], med.to_numpy()[used & shown], "o", color="C0", label="bins fitted")
        ax.loglog(p[~used & shown], med.to_numpy()[~used & shown], "o", mfc="none", color="C0", label="not fitted")
        if np.isfinite(row["k"]):
            x = _log10(p[used])
            y0, x0 = _log10(med.to_numpy()[used]).mean(), x.mean()
            xs = np.array([x.min(), x.max()])
            fit = f"fit: k = {row['k']:.2f} [{row['k_lo']:.2f}, {row['k_hi']:.2f}]"
            ax.loglog(10**xs, 10 ** (y0 - row["k"] * (xs - x0)), "C1-", label=fit)
            ax.loglog(10**xs, 10 ** (y0 - (xs - x0)), "k:", lw=1, label="k = 1 (kernel regime)")
        ax.set(title=", ".join(f"{row[c]}" for c in by), xlabel="bin density p(x)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"steps until {metric} <= {eps:g} (median)")
    return plots._save(fig, path)
