"""Calibration estimators from a labelled sample, benchmarked against the exact truth.

A practitioner estimates a classifier's calibration from n labelled examples. calibjax knows the
exact value each estimator targets for every trained network (``metrics``), so with
``eval.estimator_sizes`` set a sweep measures, at every checkpoint, each estimator on
``estimator_draws`` independent samples of each size, with bootstrap intervals where they are
cheap, beside its exact target: the rows of ``estimators.parquet`` (``summaries.estimator_benchmark``
turns them into bias, spread, RMSE and coverage).

Top-label estimators use conf_i = max_c q_c(x_i) and correct_i = [argmax_c q_c(x_i) = y_i]; B bins
(``calibration_bins``, 15 by default):

=================  ====================================================================  ==================
estimator          definition                                                            target (exact)
=================  ====================================================================  ==================
ece_width          sum_b n_b/n |acc_b - conf_b| over B equal-width bins of [0, 1]          true_ece
                   (Naeini, Cooper & Hauskrecht 2015; Guo et al. 2017)
ece_mass           the same over B equal-mass bins: sorted, example i in bin floor(i B / n)  true_ece
                   (Nixon et al. 2019; the binning of Roelofs et al.'s code)
ece_sweep          ece_mass with the largest bin count b (from 1 up) whose bin accuracies  true_ece
                   are all non-decreasing (Roelofs, Cain, Shlens & Mozer 2022, AISTATS);
                   b is searched up to ``SWEEP_MAX_BINS``
ece_l2_debiased    sqrt(max(0, sum_b n_b/n [(conf_b - acc_b)^2 - acc_b (1 - acc_b)/(n_b - 1)])),  true_ece_l2
                   equal-mass bins (Kumar, Liang & Ma 2019, NeurIPS; their code's
                   ``get_top_calibration_error``)
smece              smooth ECE (Blasiok & Nakkiran 2023): residuals correct - conf smoothed  true_smece
                   with a Gaussian kernel reflected at 0 and 1, sum |smoothed residual| /
                   sum smoothed density; the bandwidth sigma is the fixed point
                   smECE_sigma = sigma, found by bisection as in their package ``relplot``
ece_classwise      mean over classes c of the equal-width binned ECE of q_c against        true_ece_classwise
                   [y = c] (Kull et al. 2019's class-wise ECE)
=================  ====================================================================  ==================

Exact targets: true_ece = E|m(conf) - conf| (m(c) = E[P_top | conf = c]); true_ece_l2 =
sqrt(E (m(conf) - conf)^2) = sqrt(cal_term); true_smece = the smooth ECE of the population (the
same kernel smoothing with the exact P_top - conf and p(x), at its own fixed point);
true_ece_classwise = mean_c E|E[P_c | q_c] - q_c|. The binned estimators' own population values are
not their targets: their binning bias is part of what the benchmark measures.

Intervals (90 %): the basic (reverse-percentile) bootstrap [2 T - T*_0.95, 2 T - T*_0.05] (the
form of Kumar et al.'s code), from ``estimator_bootstrap`` replicates of a Gaussian multiplier
bootstrap with the bins held fixed (``_multiplier_replicates``: O(bins) per replicate, so intervals
cost nothing at n = 10^5), for ece_width, ece_mass and ece_l2_debiased. ece_sweep, smece and
ece_classwise have none (a replicate would repeat their search or sort).

All sums over a sorted sample are differences of prefix sums of residuals correct - conf (small,
so float32 keeps them) and of integer counts (exact), and every estimator of one sample is
computed by the same code whatever batch it is in (vmap), so its bits do not depend on the layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from calibjax.core import levelsets, metrics, tasks
from calibjax.core.bisection import bisect

ESTIMATORS = ("ece_width", "ece_mass", "ece_sweep", "ece_l2_debiased", "smece", "ece_classwise")
TARGETS = {
    "ece_width": "true_ece",
    "ece_mass": "true_ece",
    "ece_sweep": "true_ece",
    "ece_l2_debiased": "true_ece_l2",
    "smece": "true_smece",
    "ece_classwise": "true_ece_classwise",
}
BOOTSTRAPPED = ("ece_width", "ece_mass", "ece_l2_debiased")
INTERVAL = 0.9  # nominal coverage of the bootstrap intervals
SWEEP_MAX_BINS = 2048  # ece_sweep's bin count is searched up to min(n, this)
SMECE_GRID = 4097  # smooth ECE: points of the grid on [0, 1] the kernel sums are taken on
SMECE_MIN_SIGMA = 1e-3  # ... smallest bandwidth (relplot's eps)
SMECE_BISECTIONS = 20  # ... bisection steps for the bandwidth fixed point (relplot: 10)
ESTIMATOR_STREAM = 0xE57  # a run's estimator samples: fold_in(fold_in(key(seed), this), draw)
FORWARD_BLOCK = 8192  # examples per forward pass of the model (bounds the activations held)


class Estimates(NamedTuple):
    """One run at one checkpoint: rows of estimators.parquet, (Z sizes, D draws, E estimators) each,
    and the exact targets (E,)."""

    value: jax.Array  # the estimate from the sample
    lo: jax.Array  # its bootstrap interval (nan for estimators without one)
    hi: jax.Array
    target: jax.Array  # (E,) the exact value it estimates (TARGETS)


# ---------------------------------------------------------------- one sample


def _prefix(v: jax.Array) -> jax.Array:
    """Prefix sums along the last axis with a leading 0: sums over [i, j) are p[j] - p[i]."""
    return jnp.concatenate([jnp.zeros(v.shape[:-1] + (1,), v.dtype), jnp.cumsum(v, axis=-1)], axis=-1)


def _between(p: jax.Array, ends: jax.Array) -> jax.Array:
    """Sums over consecutive segments [ends[k-1], ends[k]) (ends[-1] = n; the first starts at 0)."""
    at = jnp.take_along_axis(p, ends, axis=-1)
    return jnp.diff(at, axis=-1, prepend=jnp.zeros_like(at[..., :1]))


def _width_ends(score_sorted: jax.Array, bins: int) -> jax.Array:
    """End (exclusive) of each equal-width bin [k/B, (k+1)/B) in a sorted score; the last holds 1."""
    edges = jnp.arange(1, bins, dtype=jnp.float32) / bins
    n = score_sorted.shape[-1]
    return jnp.concatenate([jnp.searchsorted(score_sorted, edges, side="left"), jnp.array([n])]).astype(jnp.int32)


def _mass_ends(n: int, bins: int) -> jax.Array:
    """End (exclusive) of each equal-mass bin: example i of the sorted sample is in bin floor(i B / n)."""
    k = jnp.arange(1, bins + 1)
    return (k * (n // bins) + (k * (n % bins) + bins - 1) // bins).astype(jnp.int32)


# Per-bin sums of v = (r, 1, c) (r = correct - score, c = correct) and of the products that v v^T needs.
_STATS = ("r", "n", "c", "rr", "rc")


def _bin_stats(score_s: jax.Array, hit_s: jax.Array, ends: jax.Array) -> jax.Array:
    """(5, B) per-bin sums of r, 1, c, r^2, r c over a sorted sample (differences of prefix sums)."""
    r = hit_s - score_s
    v = jnp.stack([r, jnp.ones_like(r), hit_s, r * r, r * hit_s])
    return _between(_prefix(v), jnp.broadcast_to(ends, (len(_STATS),) + ends.shape))


def _ece(res_sum, count):
    return jnp.sum(jnp.abs(res_sum), axis=-1) / jnp.sum(count, axis=-1)


def _debiased_l2(res_sum, count, correct):
    acc = jnp.clip(correct / jnp.maximum(count, 1.0), 0.0, 1.0)
    term = (res_sum / jnp.maximum(count, 1.0)) ** 2 - acc * (1.0 - acc) / jnp.maximum(count - 1.0, 1.0)
    square = jnp.sum(jnp.where(count >= 2, count * term, 0.0), axis=-1) / jnp.sum(count, axis=-1)
    return jnp.sqrt(jnp.maximum(square, 0.0))


def _multiplier_replicates(stats: jax.Array, key: jax.Array, replicates: int) -> jax.Array:
    """(replicates, 3, B) bootstrap draws of the per-bin sums of (r, 1, c).

    The Gaussian multiplier bootstrap with the bins held fixed: example i gets weight 1 + xi_i,
    xi_i ~ N(0, 1), so each bin's weighted sums sum_i (1 + xi_i) v_i are exactly normal with mean
    sum v and covariance sum v v^T, and are drawn from those per-bin moments (O(B) per replicate,
    not O(n)); bins are independent.
    """
    r, n, c, rr, rc = stats
    cov = jnp.stack([jnp.stack([rr, r, rc], -1), jnp.stack([r, n, c], -1), jnp.stack([rc, c, c], -1)], -2)
    eye = jnp.eye(3)[None]
    jitter = (1e-6 * jnp.trace(cov, axis1=-2, axis2=-1)[:, None, None] + 1e-12) * eye
    chol = _cholesky3(cov + jitter)  # (B, 3, 3)
    z = jax.random.normal(key, (replicates,) + stats.shape[1:] + (3,))  # (R, B, 3)
    # chol @ z written out (a dot's summation order would follow the CPU model XLA compiles for)
    product = [
        sum((chol[None, :, i, j] * z[..., j] for j in range(1, i + 1)), chol[None, :, i, 0] * z[..., 0])
        for i in range(3)
    ]
    return jnp.stack([r, n, c], 0)[None] + jnp.stack(product, 1)


def _cholesky3(a: jax.Array) -> jax.Array:
    """The lower Cholesky factor of symmetric positive definite 3 x 3 matrices (..., 3, 3), written out
    elementwise (LAPACK's would order its sums by the CPU it runs on)."""
    l00 = jnp.sqrt(a[..., 0, 0])
    l10, l20 = a[..., 1, 0] / l00, a[..., 2, 0] / l00
    l11 = jnp.sqrt(a[..., 1, 1] - l10 * l10)
    l21 = (a[..., 2, 1] - l20 * l10) / l11
    l22 = jnp.sqrt(a[..., 2, 2] - l20 * l20 - l21 * l21)
    zero = jnp.zeros_like(l00)
    return jnp.stack(
        [jnp.stack([l00, zero, zero], -1), jnp.stack([l10, l11, zero], -1), jnp.stack([l20, l21, l22], -1)], -2
    )


def ece_sweep(conf_s: jax.Array, correct_s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ECE_sweep (equal mass, L1) of a sorted sample, and the bin count it chose.

    Bin counts b = 2, 3, ... (example i in bin floor(i b / n)) are tried until one has a bin whose
    accuracy is below its left neighbour's; the last monotone count is used (1 if b = 2 is not).
    Accuracies are compared as float32 ratios of integer counts (exact up to rounding ties).
    """
    n = conf_s.shape[0]
    cap = min(n, SWEEP_MAX_BINS)
    residual_p = _prefix(correct_s - conf_s)
    correct_p = _prefix(correct_s)
    k = jnp.arange(cap + 1)

    def bins_of(b):
        # First example of bin k: ceil(k n / b), without forming k n (int32).
        starts = jnp.where(k <= b, k * (n // b) + (k * (n % b) + b - 1) // b, n)
        count = jnp.diff(starts).astype(jnp.float32)
        acc = jnp.diff(correct_p[starts]) / jnp.maximum(count, 1.0)
        return starts, count, acc

    def monotone(b):
        _, count, acc = bins_of(b)
        valid = (k[1:-1] < b) & (count[1:] > 0)
        return jnp.all(jnp.where(valid, acc[1:] >= acc[:-1], True))

    def cond(state):
        b, ok = state
        return ok & (b < cap)

    def body(state):
        b, _ = state
        ok = monotone(b + 1)
        return jnp.where(ok, b + 1, b), ok

    b, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), jnp.bool_(True)))
    starts, _, _ = bins_of(b)
    return jnp.sum(jnp.abs(jnp.diff(residual_p[starts]))) / n, b


def smooth_ece(
    score: jax.Array, residual: jax.Array, weight: jax.Array, bisections: int = SMECE_BISECTIONS
) -> tuple[jax.Array, jax.Array]:
    """Smooth ECE (Blasiok & Nakkiran 2023) of scores in [0, 1] with residuals (label - score) and
    weights (summing to 1): (smECE at the fixed-point bandwidth, that bandwidth).

    The weighted residuals and weights are put on a grid of SMECE_GRID points (linear split between
    neighbours) and smoothed with a Gaussian kernel reflected at 0 and 1 (as relplot's
    ReflectedGaussianKernel; here by FFT of the even periodic extension, which reflects the kernel's
    tails again beyond +-1, a difference below 1e-20 for sigma <= 0.1). In that extension an
    interior node appears twice (itself and its mirror image) and an end node once, so the end
    nodes enter it doubled: a score at 0 or 1 reflects onto itself, and its mass must count in full
    (relplot, and calibjax before 0.11.0, counted scores within one grid cell of 0 or 1 at half
    weight: a population whose smooth ECE is 0.1 gave 0.133). smECE_sigma = integral over [0, 1] of
    |smoothed residual| / integral of smoothed density, each the trapezoid rule on the grid (half
    of the sum over the extension's whole period). sigma* solves smECE_sigma = sigma: a
    bisection on [0, 1] that moves down while sigma < max(SMECE_MIN_SIGMA, smECE_sigma), as
    relplot's ``search_param``. The same function gives the population value when fed the exact
    residuals P_top - conf and p(x) weights.
    """
    k = SMECE_GRID
    order = jnp.argsort(score)
    pos = jnp.clip(score[order], 0.0, 1.0) * (k - 1)
    idx = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, k - 2)
    frac = pos - idx
    values = jnp.stack([weight * residual, weight])[:, order]  # (2, n), by score
    # Grid sums as differences of prefix sums over the sorted scores (deterministic on every
    # backend, unlike a scatter-add): cell j gets (1 - frac) of the examples with idx = j and frac
    # of those with idx = j - 1.
    ends = jnp.searchsorted(idx, jnp.arange(k - 1), side="right").astype(jnp.int32)
    low = _between(_prefix(values * (1 - frac)[None, :]), jnp.broadcast_to(ends, (2, k - 1)))
    high = _between(_prefix(values * frac[None, :]), jnp.broadcast_to(ends, (2, k - 1)))
    grid = jnp.pad(low, ((0, 0), (0, 1))) + jnp.pad(high, ((0, 0), (1, 0)))
    doubled = jnp.ones(k, jnp.float32).at[0].set(2.0).at[-1].set(2.0)
    periodic = jnp.concatenate([grid * doubled[None, :], grid[:, -2:0:-1]], axis=1)  # even extension, period 2 (k - 1)
    spectrum = jnp.fft.rfft(periodic, axis=1)
    freq = jnp.arange(spectrum.shape[1], dtype=jnp.float32) / 2.0  # cycles per unit of score

    def at(sigma):
        smoothed = jnp.fft.irfft(
            spectrum * jnp.exp(-2.0 * (math.pi * sigma * freq) ** 2)[None, :], n=periodic.shape[1], axis=1
        )
        return jnp.sum(jnp.abs(smoothed[0])) / jnp.maximum(jnp.sum(smoothed[1]), 1e-30)

    # Where the fixed-point condition holds the root lies below mid: "lo" is the end at 0, and sigma
    # the end that starts at 1 (relplot's start).
    below = lambda mid: (mid < SMECE_MIN_SIGMA) | (mid < at(mid))  # noqa: E731
    _, sigma = bisect(below, jnp.float32(0.0), jnp.float32(1.0), bisections)
    return at(sigma), sigma


def sample_estimates(
    log_q: jax.Array, y: jax.Array, bins: int, replicates: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every estimator of one labelled sample (log q (n, M), labels (n,)): (value, lo, hi), (E,) each."""
    n = y.shape[0]
    conf = jnp.exp(jnp.max(log_q, axis=-1))
    correct = (jnp.argmax(log_q, axis=-1) == y).astype(jnp.float32)
    order = jnp.argsort(conf)  # stable: ties keep the sample's order
    conf_s, correct_s = conf[order], correct[order]
    width = _bin_stats(conf_s, correct_s, _width_ends(conf_s, bins))
    mass = _bin_stats(conf_s, correct_s, _mass_ends(n, bins))

    def binned(width, mass):  # width, mass: (..., 5 or 3, B) per-bin sums, r n c first
        return {
            "ece_width": _ece(width[..., 0, :], width[..., 1, :]),
            "ece_mass": _ece(mass[..., 0, :], mass[..., 1, :]),
            "ece_l2_debiased": _debiased_l2(mass[..., 0, :], mass[..., 1, :], mass[..., 2, :]),
        }

    def classwise(c):
        q = jnp.exp(log_q[:, c])
        by_q = jnp.argsort(q)
        q_s = q[by_q]
        stats = _bin_stats(q_s, (y[by_q] == c).astype(jnp.float32), _width_ends(q_s, bins))
        return _ece(stats[0], stats[1])

    values = binned(width, mass)
    values["ece_classwise"] = jnp.mean(jax.vmap(classwise)(jnp.arange(log_q.shape[-1])))
    values["ece_sweep"], _ = ece_sweep(conf_s, correct_s)
    values["smece"], _ = smooth_ece(conf, correct - conf, jnp.full((n,), 1.0 / n, jnp.float32))
    value = jnp.stack([values[e] for e in ESTIMATORS])
    lo = hi = jnp.full((len(ESTIMATORS),), jnp.nan, jnp.float32)
    if replicates:
        k_width, k_mass = jax.random.split(key)
        boot = binned(
            _multiplier_replicates(width, k_width, replicates), _multiplier_replicates(mass, k_mass, replicates)
        )
        tail = (1.0 - INTERVAL) / 2.0
        for i, e in enumerate(ESTIMATORS):
            if e in boot:
                q_lo, q_hi = jnp.quantile(boot[e], jnp.array([tail, 1.0 - tail]))
                lo = lo.at[i].set(jnp.maximum(2.0 * value[i] - q_hi, 0.0))
                hi = hi.at[i].set(2.0 * value[i] - q_lo)
    return value, lo, hi


# ---------------------------------------------------------------- a run at a checkpoint


def targets(ev: metrics.EvalSet, log_q: jax.Array, scalars: metrics.Scalars) -> jax.Array:
    """(E,) the exact value each estimator targets (TARGETS), from the model's log q on the
    evaluation set and the checkpoint's exact metrics."""
    w, p = ev.weight, jnp.exp(ev.log_post)
    conf, pred = metrics.top_label(log_q)
    p_top = jnp.take_along_axis(p, pred[:, None], axis=-1)[:, 0]
    smece, _ = smooth_ece(conf, p_top - conf, w)
    classes = jnp.arange(log_q.shape[-1])
    if ev.x.shape[-1] == 1:
        classwise = [levelsets.class_calibration_error(log_q[:, c], p[:, c], w) for c in range(log_q.shape[-1])]
    else:
        residual = jax.vmap(lambda c: metrics.sample_curve(jnp.exp(log_q[:, c]), p[:, c])[0])(classes)
        classwise = [jnp.sum(w * jnp.abs(r)) for r in residual]
    exact = {
        "true_ece": scalars.true_ece,
        "true_ece_l2": jnp.sqrt(scalars.cal_term),
        "true_smece": smece,
        # each class summed on its own: XLA compiled the (classes x points) row sum differently
        # for an emulated Haswell than for an AVX-512 Xeon (1 ulp; tests/test_portability.py)
        "true_ece_classwise": jnp.mean(jnp.stack(classwise)),
    }
    return jnp.stack([exact[TARGETS[e]] for e in ESTIMATORS])


def benchmark(
    task: tasks.GaussianTask, seed: jax.Array, forward, target: jax.Array, spec: metrics.EvalSpec
) -> Estimates:
    """Every estimator on ``estimator_draws`` independent labelled samples of each size in
    ``estimator_sizes``, from the model ``forward`` (x (D,) -> log q (M,)).

    Draw d is the first n of n_max examples drawn from fold_in(fold_in(key(seed), ESTIMATOR_STREAM),
    d): the samples of one size are independent, those of one draw nested (as a user's test set
    grows); every checkpoint of a run sees the same samples. The model runs over them in blocks of
    FORWARD_BLOCK examples, so memory stays bounded whatever n_max is.
    """
    sizes, n_max = spec.estimator_sizes, max(spec.estimator_sizes)
    base = jax.random.fold_in(jax.random.key(seed), ESTIMATOR_STREAM)

    def one_draw(d):
        data_key, boot_key = jax.random.split(jax.random.fold_in(base, d))
        x, y = tasks.draw(task, data_key, jnp.arange(n_max, dtype=jnp.uint32))
        log_q = jax.lax.map(forward, x, batch_size=min(FORWARD_BLOCK, n_max))
        per_size = [
            sample_estimates(
                log_q[:n], y[:n], spec.calibration_bins, spec.estimator_bootstrap, jax.random.fold_in(boot_key, z)
            )
            for z, n in enumerate(sizes)
        ]
        return tuple(jnp.stack(v) for v in zip(*per_size, strict=True))  # (Z, E) each

    value, lo, hi = jax.lax.map(one_draw, jnp.arange(spec.estimator_draws))  # (D, Z, E)
    return Estimates(*(jnp.swapaxes(v, 0, 1) for v in (value, lo, hi)), target)
