"""Metrics against the exact posterior.

Every expectation over x ~ p(x) is a weighted sum over an evaluation set:
in 1-D a midpoint quadrature on a uniform grid covering every component's
mean +- ``grid_sigmas`` sigma (mass outside is below 1e-15 at 8 sigma), with
weights p(x_i) dx renormalised to sum to one; for D > 1 a fixed Monte-Carlo
sample from p(x) (the same sample for every run of a task, whatever its seed)
with weights 1/S. These points depend only on the task. The labelled sample of the estimated
calibration metrics is the run's own (drawn from its seed, as a user's held-out test set would be).
The set is built once per run, outside the step loop.

In D > 1 every expectation carries Monte-Carlo error (about 2e-3 absolute on accuracies with the
default 2048 points); the true calibration error records its standard error (``true_ece_se``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from calibjax.core import levelsets, tasks
from calibjax.core.bisection import bisect
from calibjax.core.settings import setting

LOG10_E = 0.43429448190325176  # 1 / log(10) as 0.8.0 computed it with glibc: a literal, the same on every machine
EVAL_SEED = 20250428  # the fixed Monte-Carlo evaluation sample (D > 1) comes from this key
CALIBRATION_STREAM = 0x5CA1  # a run's labelled test sample: fold_in(key(seed), this); training uses split(key(seed))


@dataclass(frozen=True)
class EvalSpec:
    """Static evaluation settings (they fix array shapes); each field declared with ``setting`` is
    the [eval] setting of the same name."""

    points: int = setting("eval", "pos_int", 2048)  # grid points (D = 1) or Monte-Carlo samples (D > 1)
    grid_sigmas: float = 8.0  # 1-D grid half-width around each component, in sigmas
    hdr_mass: float = setting("eval", "fraction", 0.999)  # max_err is taken over the densest region holding this mass
    density_edges: tuple[float, ...] = setting("eval", "edges", (-6.0, -5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0))
    dense_mass: float = setting("eval", "fraction", 0.9)  # err_dense: max error over the densest region holding this
    sparse_mass: float = setting("eval", "fraction", 0.01)  # err_sparse: ... over the least dense this much of hdr
    # labelled test sample (per run) for the estimated calibration metrics
    calibration_samples: int = setting("eval", "pos_int", 5000)
    calibration_bins: int = setting("eval", "pos_int", 15)  # equal-width / equal-mass bins of ECE and reliability
    # The calibration-estimator benchmark (calibjax.core.estimators), off unless sizes are given:
    estimator_sizes: tuple[int, ...] = setting("eval", "sizes", ())  # labelled-sample sizes each estimator gets
    estimator_draws: int = setting("eval", "pos_int", 16)  # independent samples of each size, per run and checkpoint
    estimator_bootstrap: int = setting("eval", "nonneg_int", 200)  # bootstrap replicates (0: no intervals)
    temperature_scaling: bool = setting("eval", "bool", False)  # also measure after post-hoc temperature scaling
    # also split kl (and the top label's KL) into what recalibration can remove and what it cannot
    # (Scalars.kl_cal ...; nan when off): for two classes a second level-set solve per checkpoint
    kl_split: bool = setting("eval", "bool", False)

    @property
    def num_bins(self) -> int:
        return len(self.density_edges) + 1

    def bin_bounds(self) -> tuple[list[float], list[float]]:
        """(lo, hi) of each log10-density bin; the outer bins are open (-inf, inf)."""
        edges = list(self.density_edges)
        return [-math.inf] + edges, edges + [math.inf]


class Scalars(NamedTuple):
    """One run at one checkpoint: a row of metrics.parquet, in column order (float32 scalars)."""

    kl: jax.Array  # E_x KL(P(C|x) || q(C|x)), nats
    kl_rel: jax.Array  # kl / I(C;X): the share of the learnable information still missing
    tv: jax.Array  # E_x total variation
    max_err: jax.Array  # max_x max_c |P - q| over the hdr region
    accuracy: jax.Array  # E_x P(argmax q | x) (quadrature in 1-D, Monte Carlo in D > 1)
    bayes_accuracy: jax.Array  # E_x max_c P(c | x)
    loss: jax.Array  # mean training loss since the previous checkpoint (nan if none)
    err_dense: jax.Array  # max error over the densest region holding dense_mass
    err_sparse: jax.Array  # max error over the hdr region's least dense sparse_mass (by default the
    # points whose density quantile lies in 98.9-99.9 %: the tail edge of the hdr)
    ece: jax.Array  # estimated from the labelled sample: equal-width ECE
    ece_mass: jax.Array  # ... equal-mass ECE
    brier: jax.Array  # ... Brier score
    nll: jax.Array  # ... negative log-likelihood
    true_ece: jax.Array  # against the exact posterior: E |m(conf) - conf|, m(c) = E[P_top | conf = c]
    true_ece_se: jax.Array  # its Monte-Carlo standard error (D > 1); 0 in 1-D (deterministic quadrature)
    excess_brier: jax.Array  # E sum_c (q_c - P_c)^2
    cal_term: jax.Array  # E (conf - m)^2
    grouping_term: jax.Array  # E (m - P_top)^2
    kl_cal: jax.Array  # E KL(m(q) || q), m(q) = E[P | q]: the part of kl a recalibration of q can
    # remove (two classes: exactly, from the level sets of q_1; nan for more classes)
    kl_group: jax.Array  # E KL(P || m(q)): the part none can (kl_cal + kl_group = kl)
    kl_cal_top: jax.Array  # the top label's split, as Bernoulli distributions: E KL(m(conf) || conf)
    kl_group_top: jax.Array  # E KL(P_top || m(conf)) (the two sum to E KL(P_top || conf), = kl for two classes)
    kl_optimum: jax.Array  # E_x KL(P || q*), q* the training loss's population optimum: the kl a
    # perfectly trained network would keep (0 for proper losses; calibjax.core.losses)
    kl_to_optimum: jax.Array  # E_x KL(q* || q): how far the network is from its own loss's optimum
    err_to_optimum: jax.Array  # max_x max_c |q* - q| over the hdr region


class DensityBins(NamedTuple):
    """One run at one checkpoint, per log10-density bin: (NB,) each; rows of density.parquet."""

    mass: jax.Array  # probability mass of the bin
    kl_mean: jax.Array  # mean KL(P || q) within the bin, E[KL | bin]; nan for an empty bin
    kl_contribution: jax.Array  # the bin's share of kl: mass x kl_mean (the bins sum to kl)
    max_err: jax.Array  # max error in the bin; nan for an empty bin
    kl_optimum_mean: jax.Array  # E[KL(P || q*) | bin]: where the training loss's own optimum departs from P
    kl_cal_mean: jax.Array  # E[KL(m(q) || q) | bin] (Scalars.kl_cal within the bin)
    kl_group_mean: jax.Array  # E[KL(P || m(q)) | bin]
    kl_cal_top_mean: jax.Array  # E[KL(m(conf) || conf) | bin]
    kl_group_top_mean: jax.Array  # E[KL(P_top || m(conf)) | bin]


SPLIT = ("kl_cal", "kl_group", "kl_cal_top", "kl_group_top")  # true_calibration's split of kl, per point


class ReliabilityBins(NamedTuple):
    """One run at one checkpoint, per confidence bin: (CB,) each; rows of calibration.parquet."""

    est_count: jax.Array  # labelled examples in the bin
    est_conf: jax.Array  # their mean confidence
    est_acc: jax.Array  # their accuracy
    true_mass: jax.Array  # probability mass of the bin under p(x)
    true_conf: jax.Array  # its mean confidence
    true_acc: jax.Array  # its mean P(prediction right | x)


class Evaluation(NamedTuple):
    """Everything measured at one checkpoint."""

    scalars: Scalars
    density: DensityBins
    reliability: ReliabilityBins
    estimators: Any = None  # calibjax.core.estimators.Estimates when eval.estimator_sizes is set
    recalibrated: Any = None  # Recalibrated when eval.temperature_scaling is set


class Recalibrated(NamedTuple):
    """One run at one checkpoint after post-hoc temperature scaling (q_T = softmax(log q / T), T
    fitted by NLL on the run's labelled sample): a row of recalibrated.parquet."""

    temperature: jax.Array  # the fitted T (> 1: the network was overconfident)
    kl: jax.Array  # the metrics of Scalars, of q_T
    max_err: jax.Array
    err_dense: jax.Array
    err_sparse: jax.Array
    true_ece: jax.Array
    cal_term: jax.Array
    grouping_term: jax.Array
    kl_cal: jax.Array
    kl_group: jax.Array


def _pick(record: type, values: dict[str, jax.Array]):
    """Fill a record (a NamedTuple) from a dict of named results: its fields fix what is kept."""
    return record(*(values[name] for name in record._fields))


class EvalSet(NamedTuple):
    x: jax.Array  # (G, D) evaluation points
    weight: jax.Array  # (G,) probability mass of each point; sums to 1
    log_post: jax.Array  # (G, M) exact log P(c | x)
    log10_density: jax.Array  # (G,) log10 p(x)
    in_hdr: jax.Array  # (G,) bool, inside the densest region holding hdr_mass
    in_dense: jax.Array  # (G,) bool, inside the densest region holding dense_mass
    in_sparse: jax.Array  # (G,) bool, the hdr region's least dense sparse_mass
    bins: jax.Array  # (G, NB) float32 one-hot of the log10-density bin
    bin_share: jax.Array  # (G, NB) the share of each point's mass in each bin (``density_bin_shares``)
    bin_index: jax.Array  # (G,) int32 the same bin as an index (its sums: _bin_sums)
    cal_x: jax.Array  # (S, D) labelled test sample, the run's own (drawn from its seed)
    cal_y: jax.Array  # (S,) int32 its labels
    mutual_info: jax.Array  # () I(C; X) = H(C) - H(C | X) in nats: the kl of a classifier that ignores x
    # and outputs the priors (computed once per run, not per checkpoint)
    log_opt: jax.Array  # (G, M) log q*: the training loss's population optimum (log_post for proper losses)
    kl_optimum: jax.Array  # () E KL(P || q*): the kl of the loss's optimum (task and loss only: once per run)
    kl_optimum_bins: jax.Array  # (NB,) its weighted sum within each log10-density bin


def eval_points(task: tasks.GaussianTask, spec: EvalSpec) -> tuple[jax.Array, jax.Array]:
    """Evaluation points (G, D) and their unnormalised weights (G,)."""
    if task.dim == 1:
        lo, hi = tasks.support_range(task, spec.grid_sigmas)
        dx = (hi - lo) / spec.points
        x = lo[None, :] + dx[None, :] * (jnp.arange(spec.points, dtype=jnp.float32)[:, None] + 0.5)
        logd = jax.vmap(tasks.log_density, (None, 0))(task, x)
        return x, jnp.exp(logd - jnp.max(logd))
    x, _ = draw(task, spec.points, 0)
    return x, jnp.ones((spec.points,), jnp.float32)


def draw(task: tasks.GaussianTask, n: int, stream: int) -> tuple[jax.Array, jax.Array]:
    """n labelled examples from the fixed evaluation key (independent of any run's seed)."""
    key = jax.random.fold_in(jax.random.key(EVAL_SEED), stream)
    return tasks.draw(task, key, jnp.arange(n, dtype=jnp.uint32))


def calibration_key(seed: jax.Array) -> jax.Array:
    """The key of a run's labelled test sample: independent of its initialisation and data streams."""
    return jax.random.fold_in(jax.random.key(seed), CALIBRATION_STREAM)


def make_eval_set(task: tasks.GaussianTask, spec: EvalSpec, seed: jax.Array | int = 0, optimum=None) -> EvalSet:
    """The evaluation set of a run of ``task`` with this seed (only the labelled sample depends on it);
    ``optimum`` maps log P to the training loss's population optimum log q* (default: P itself)."""
    x, w = eval_points(task, spec)
    weight = w / jnp.sum(w)
    log_post = jax.vmap(tasks.log_posterior, (None, 0))(task, x)
    log10_density = jax.vmap(tasks.log_density, (None, 0))(task, x) * LOG10_E
    # Densest-first cumulative mass: a point is in the region if the mass denser than it is < hdr_mass.
    order = jnp.argsort(-log10_density)
    mass_before = jnp.zeros_like(weight).at[order].set(jnp.cumsum(weight[order]) - weight[order])
    in_hdr = mass_before < spec.hdr_mass
    in_dense = mass_before < spec.dense_mass
    in_sparse = in_hdr & (mass_before >= spec.hdr_mass - spec.sparse_mass)
    edges = jnp.asarray(spec.density_edges, jnp.float32)
    bin_index = jnp.searchsorted(edges, log10_density, side="left")  # bin i = (edge[i-1], edge[i]]
    bins = jax.nn.one_hot(bin_index, spec.num_bins, dtype=jnp.float32)
    share = density_bin_shares(log10_density, edges) if task.dim == 1 else bins
    cal_x, cal_y = tasks.draw(
        task, calibration_key(jnp.asarray(seed, jnp.uint32)), jnp.arange(spec.calibration_samples, dtype=jnp.uint32)
    )
    prior = jnp.exp(task.log_prior)
    mutual_info = -jnp.sum(jnp.where(prior > 0, prior * task.log_prior, 0.0)) - _conditional_entropy(weight, log_post)
    log_opt = optimum(log_post) if optimum is not None else log_post
    kl_opt = weight * pointwise_kl(log_post, log_opt)
    return EvalSet(
        x,
        weight,
        log_post,
        log10_density,
        in_hdr,
        in_dense,
        in_sparse,
        bins,
        share,
        bin_index,
        cal_x,
        cal_y,
        mutual_info,
        log_opt,
        jnp.sum(kl_opt),
        density_bin_sums(share, bin_index, task.dim == 1, kl_opt)[0],
    )


def density_bin_shares(log10_density: jax.Array, edges: jax.Array) -> jax.Array:
    """(G, NB): the share of each 1-D grid point's mass in each log10-density bin, so that a bin's
    mass does not depend on where the grid points fall (0.11.0 put each point's whole cell in its
    point's bin: bin masses off by up to 6.3e-3, kl_mean by 10 %, on a task with priors 0.01/0.99
    and sigmas 4 and 0.5).

    Point i stands for the cell from halfway to its left neighbour to halfway to its right one.
    log10 p is taken as linear on each half of the cell, from the value at the cell's edge (the
    mean of the two points' values; extrapolated at the grid's ends) to the point's own, so a
    cell holding a mode or a bin edge is split exactly there; each half carries half the point's
    weight, spread evenly along it. Bin b = (edge[b-1], edge[b]] as for the points themselves."""
    d = log10_density
    left = jnp.concatenate([d[:1] - 0.5 * (d[1:2] - d[:1]), 0.5 * (d[:-1] + d[1:])])
    right = jnp.concatenate([0.5 * (d[:-1] + d[1:]), d[-1:] + 0.5 * (d[-1:] - d[-2:-1])])

    def below(start, end, e):
        """The share of a half on which log10 p (linear from start to end) is <= e."""
        span = end - start
        t = jnp.clip((e - start) / jnp.where(span == 0, 1.0, span), 0.0, 1.0)
        return jnp.where(span > 0, t, jnp.where(span < 0, 1.0 - t, (start <= e).astype(d.dtype)))

    cuts = [jnp.zeros_like(d)]
    for e in edges:
        cuts.append(0.5 * (below(left, d, e) + below(d, right, e)))
    cuts.append(jnp.ones_like(d))
    return jnp.stack([b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)], axis=-1)


def density_bin_sums(share: jax.Array, bin_index: jax.Array, fractional: bool, *values: jax.Array) -> list[jax.Array]:
    """Each value (G,) summed within each log10-density bin (NB,): on a 1-D grid (``fractional``)
    by the points' shares of each bin (``density_bin_shares``), one bin at a time (a sum over
    points and bins at once is compiled differently for different CPUs); in D > 1 by each sample
    point's own bin (``_bin_sums``: a Monte-Carlo point has no cell)."""
    if not fractional:
        return _bin_sums(bin_index, share.shape[-1], *values)
    return [jnp.stack([jnp.sum(v * share[:, b]) for b in range(share.shape[-1])]) for v in values]


def pointwise_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(P || q) along the last axis; terms with P = 0 contribute 0 (not 0 * inf = nan)."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def conditional_entropy(ev: EvalSet) -> jax.Array:
    """H(C | X) in nats: the Bayes cross-entropy, the floor of the expected training loss."""
    return _conditional_entropy(ev.weight, ev.log_post)


def _conditional_entropy(weight: jax.Array, log_post: jax.Array) -> jax.Array:
    p = jnp.exp(log_post)
    return -jnp.sum(weight * jnp.sum(jnp.where(p > 0, p * log_post, 0.0), axis=-1))


def _bin_sums(index: jax.Array, num: int, *values: jax.Array) -> list[jax.Array]:
    """Sum each value over the points of each bin (index (N,) in [0, num)).

    On CPU a scatter-add (50x faster than the one-hot product for 2048 points in 200 bins, and it
    adds in point order on every CPU, where the product's order follows the CPU model XLA compiles
    for); on accelerators the one-hot product, which is fast there and, unlike atomic scatter-adds,
    deterministic.
    """
    return jax.lax.platform_dependent(
        index, *values, cpu=functools.partial(_scatter_sums, num), default=functools.partial(_onehot_sums, num)
    )


def _scatter_sums(num: int, index: jax.Array, *values: jax.Array) -> list[jax.Array]:
    return [jax.ops.segment_sum(v, index, num) for v in values]


def _onehot_sums(num: int, index: jax.Array, *values: jax.Array) -> list[jax.Array]:
    hot = jax.nn.one_hot(index, num, dtype=jnp.float32)
    return [v @ hot for v in values]


def top_label(log_q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Confidence max_c q_c and the predicted class."""
    return jnp.exp(jnp.max(log_q, axis=-1)), jnp.argmax(log_q, axis=-1)


def confidence_bin(conf: jax.Array, num: int) -> jax.Array:
    return jnp.clip(jnp.floor(conf * num).astype(jnp.int32), 0, num - 1)


def estimated_calibration(log_q: jax.Array, y: jax.Array, spec: EvalSpec) -> dict[str, jax.Array]:
    """The usual estimates from a labelled sample: ECE (equal-width and equal-mass), Brier, NLL.

    ECE is top-label: sum over bins of |accuracy - confidence| weighted by the bin's share.
    """
    s, b = y.shape[0], spec.calibration_bins
    conf, pred = top_label(log_q)
    correct = (pred == y).astype(jnp.float32)
    count, sum_conf, sum_acc = _bin_sums(confidence_bin(conf, b), b, jnp.ones_like(conf), conf, correct)
    sorted_conf, sorted_correct = jax.lax.sort((conf, correct), num_keys=1)
    group = (jnp.arange(s) * b) // s  # equal-mass bins: b groups of consecutive confidences
    mass_conf, mass_acc = _bin_sums(group, b, sorted_conf, sorted_correct)
    onehot = jax.nn.one_hot(y, log_q.shape[-1], dtype=jnp.float32)
    return {
        "ece": jnp.sum(jnp.abs(sum_acc - sum_conf)) / s,
        "ece_mass": jnp.sum(jnp.abs(mass_acc - mass_conf)) / s,
        "brier": jnp.mean(jnp.sum((jnp.exp(log_q) - onehot) ** 2, axis=-1)),
        "nll": -jnp.mean(jnp.sum(onehot * log_q, axis=-1)),
        "est_count": count,
        "est_conf": sum_conf / jnp.maximum(count, 1.0),
        "est_acc": sum_acc / jnp.maximum(count, 1.0),
    }


def true_calibration(ev: EvalSet, log_q: jax.Array, spec: EvalSpec) -> dict[str, jax.Array]:
    """Calibration against the exact posterior, under p(x) (without sampling noise in 1-D).

    Top-label: conf = max_c q_c, and P_top = P(argmax q | x) is the true probability that the
    prediction is right. The true calibration curve is m(c) = E[P_top | conf = c], an average over
    the level set {x : conf(x) = c}; then
      true_ece      = E |m(conf) - conf|
      cal_term      = E (conf - m)^2        grouping_term = E (m - P_top)^2
    (cal_term + grouping_term = E (conf - P_top)^2, the cross term vanishing because m is the
    conditional mean). excess_brier = E sum_c (q_c - P_c)^2 is the Brier score above the Bayes
    classifier's; the excess NLL above Bayes is exactly kl.

    With ``eval.kl_split`` (else nan), the split of kl by what recalibration can reach: m(q) =
    E[P | q] is the best any map of q can do, and kl = E KL(P || q) = E KL(P || m) + E KL(m || q)
    exactly (on a level set of q, E[P] = m, so the cross term vanishes):
      kl_cal        = E KL(m(q) || q)     what an ideal recalibrator would remove
      kl_group      = E KL(P || m(q))     what none can (x's with one q and different P)
    solved for two classes (q is a function of q_1: levels of q_1; nan for more classes, whose
    vector q has no level sets solved here), and for the top label of any task as Bernoulli
    distributions: kl_cal_top = E KL(m(conf) || conf), kl_group_top = E KL(P_top || m(conf)).
    Their values at each point (G,) are under "split" (for the density bins).

    m is solved, not binned: in 1-D (``levelsets``) from the level sets between the quadrature
    grid's points, the expectations integrated over the levels (the split's values per point: m
    at the middle of each half cell); in D > 1 (``sample_curve``) from equal-mass groups of the
    Monte-Carlo points, with a standard error for true_ece (the split there is a Monte-Carlo
    estimate, with the groups' bias). The reliability table bins the same points into
    ``calibration_bins`` equal-width confidence bins.
    """
    w = ev.weight
    p = jnp.exp(ev.log_post)
    conf, pred = top_label(log_q)
    p_top = jnp.take_along_axis(p, pred[:, None], axis=-1)[:, 0]
    binary = spec.kl_split and log_q.shape[-1] == 2
    if ev.x.shape[-1] == 1:
        if binary:
            terms = levelsets.binary_level_sets(log_q, p, w)
        else:
            terms = levelsets.level_set_terms(log_q, p, w, split=spec.kl_split)
        split = {k: terms.pop(k + "_points") for k in SPLIT if k + "_points" in terms}
        terms["true_ece_se"] = jnp.float32(0.0)
    else:
        residual, se = sample_curve(conf, p_top)
        terms = {
            "true_ece": jnp.sum(w * jnp.abs(residual)),
            "true_ece_se": se,
            "cal_term": jnp.sum(w * residual**2),
            "grouping_term": jnp.sum(w * (conf + residual - p_top) ** 2),
        }
        split = _sample_split(log_q, p, conf, p_top, residual, binary) if spec.kl_split else {}
        terms |= {k: jnp.sum(w * v) for k, v in split.items()}
    missing = {k: jnp.full_like(w, jnp.nan) for k in SPLIT if k not in split}
    terms |= {k: jnp.float32(jnp.nan) for k in missing}
    split |= missing
    coarse = confidence_bin(conf, spec.calibration_bins)
    rel_mass, rel_conf, rel_acc = _bin_sums(coarse, spec.calibration_bins, w, w * conf, w * p_top)
    return (
        terms
        | {"split": split}
        | {
            "excess_brier": jnp.sum(w * jnp.sum((jnp.exp(log_q) - p) ** 2, axis=-1)),
            "true_mass": rel_mass,
            "true_conf": rel_conf / jnp.maximum(rel_mass, 1e-30),
            "true_acc": rel_acc / jnp.maximum(rel_mass, 1e-30),
        }
    )


def _sample_split(log_q, p, conf, p_top, residual, binary: bool) -> dict[str, jax.Array]:
    """The split of kl at each Monte-Carlo point (D > 1), m from ``sample_curve``'s groups: of the
    top label, and for two classes by the levels of q_1 (scores below e^-69 read as e^-69)."""
    score = lambda log_s: jnp.exp(jnp.maximum(log_s, -69.0))  # noqa: E731
    m = conf + residual
    conf_bar = jnp.maximum(-jnp.expm1(jnp.max(log_q, axis=-1)), 1e-30)
    split = {
        "kl_cal_top": levelsets.bernoulli_kl(jnp.clip(m, 0.0, 1.0), conf, conf_bar),
        "kl_group_top": levelsets.kl_to_estimate(p_top, m),
    }
    if binary:
        q1 = score(log_q[:, 1])
        m = q1 + sample_curve(q1, p[:, 1])[0]
        split |= {
            "kl_cal": levelsets.bernoulli_kl(jnp.clip(m, 0.0, 1.0), q1, score(log_q[:, 0])),
            "kl_group": levelsets.kl_to_estimate(p[:, 1], m),
        }
    return split


def sample_curve(conf: jax.Array, p_top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """m(conf_i) - conf_i on an equally weighted Monte-Carlo sample (S,) (D > 1), and the standard
    error of true_ece.

    Level sets have no finite sample, so the residual P_top - conf is averaged within
    round(sqrt(S)) groups of consecutive confidences (equal mass; sqrt balances the bias of wide
    groups against the noise of small ones). true_ece = sum_g n_g |mean_g| / S is a Monte-Carlo mean,
    so its standard error has two parts: the spread of |m(conf)| over the sample (between groups,
    sum_g n_g (|mean_g| - true_ece)^2) and the noise of each group's mean (within groups,
    sum_g n_g var_g); se = sqrt(between + within) / S. (Before 0.11.0 only the within part was
    counted, which understated the error 2.5-4x on the audited tasks.)
    """
    s = conf.shape[0]
    groups = max(1, round(math.sqrt(s)))
    order = jnp.argsort(conf)
    r = (p_top - conf)[order]
    g = (jnp.arange(s) * groups) // s
    n, total, square = _bin_sums(g, groups, jnp.ones_like(r), r, r * r)
    mean = total / n
    var = jnp.maximum(square - n * mean**2, 0.0) / jnp.maximum(n - 1, 1.0)
    residual = jnp.zeros_like(r).at[order].set(mean[g])
    ece = jnp.sum(n * jnp.abs(mean)) / s
    between = jnp.sum(n * (jnp.abs(mean) - ece) ** 2)
    return residual, jnp.sqrt(between + jnp.sum(n * var)) / s


def errors(ev: EvalSet, log_q: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Errors of a model's log q(c | x_i) (G, M) against the exact posterior.

    Scalars by name: kl, kl_rel, kl_optimum, kl_to_optimum, err_to_optimum, tv, max_err (over the hdr
    region), err_dense, err_sparse, accuracy, bayes_accuracy; and per log10-density bin the mass, kl,
    max_err and the loss optimum's kl (DensityBins' fields but the split's, ``split_bins``).
    """
    p = jnp.exp(ev.log_post)
    q = jnp.exp(log_q)
    kl_i = pointwise_kl(ev.log_post, log_q)
    abs_err = jnp.abs(p - q)
    err_i = jnp.max(abs_err, axis=-1)
    # Accuracy of a decision rule, exactly: E_x P(argmax q | x); Bayes picks argmax P.
    p_chosen = jnp.take_along_axis(p, jnp.argmax(log_q, axis=-1)[:, None], axis=-1)[:, 0]
    in_bin = ev.bins > 0
    bin_max = jnp.max(jnp.where(in_bin, err_i[:, None], -jnp.inf), axis=0)
    region_max = lambda mask, err=err_i: jnp.max(jnp.where(mask, err, 0.0))  # noqa: E731  (nan propagates)
    kl = jnp.sum(ev.weight * kl_i)
    scalars = {
        "kl": kl,
        "kl_rel": kl / ev.mutual_info,
        "kl_optimum": ev.kl_optimum,
        "kl_to_optimum": jnp.sum(ev.weight * pointwise_kl(ev.log_opt, log_q)),
        "err_to_optimum": region_max(ev.in_hdr, jnp.max(jnp.abs(jnp.exp(ev.log_opt) - q), axis=-1)),
        "tv": jnp.sum(ev.weight * 0.5 * jnp.sum(abs_err, axis=-1)),
        "max_err": region_max(ev.in_hdr),
        "err_dense": region_max(ev.in_dense),
        "err_sparse": region_max(ev.in_sparse),
        "accuracy": jnp.sum(ev.weight * p_chosen),
        "bayes_accuracy": jnp.sum(ev.weight * jnp.max(p, axis=-1)),
    }
    mass, kl_contribution = density_bin_sums(
        ev.bin_share, ev.bin_index, ev.x.shape[-1] == 1, ev.weight, ev.weight * kl_i
    )
    density = {
        "mass": mass,
        "kl_mean": _per_mass(kl_contribution, mass),
        "kl_contribution": kl_contribution,
        "max_err": jnp.where(jnp.any(in_bin, axis=0), bin_max, jnp.nan),
        "kl_optimum_mean": _per_mass(ev.kl_optimum_bins, mass),
    }
    return scalars, density


def split_bins(ev: EvalSet, split: dict[str, jax.Array], mass: jax.Array) -> dict[str, jax.Array]:
    """The calibration split's values at each point (``true_calibration``'s "split") as means within
    each log10-density bin: kl_cal_mean, kl_group_mean, kl_cal_top_mean, kl_group_top_mean. (Within
    a bin the two parts need not add up to kl_mean: the cross term vanishes on level sets of q, not
    on regions of x; weighted by mass, the bins add up to the totals.)"""
    names = list(split)
    sums = density_bin_sums(ev.bin_share, ev.bin_index, ev.x.shape[-1] == 1, *(ev.weight * split[k] for k in names))
    return {k + "_mean": _per_mass(v, mass) for k, v in zip(names, sums, strict=True)}


def _per_mass(total: jax.Array, mass: jax.Array) -> jax.Array:
    return jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), jnp.nan)


def evaluate(
    ev: EvalSet, log_q: jax.Array, log_q_cal: jax.Array, spec: EvalSpec, loss: jax.Array | float = jnp.nan
) -> Evaluation:
    """Everything measured at a checkpoint, from the model's log q on the evaluation set (G, M)
    and on the labelled sample (S, M), and the mean training loss since the last checkpoint.

    To add a metric: compute it under a name in one of the functions called here and add that
    name as a field of the record it belongs to (Scalars, ReliabilityBins; DensityBins is built
    in ``errors``); tables, columns, sort keys and memory estimates follow from the records.
    """
    scalars, density = errors(ev, log_q)
    truth = true_calibration(ev, log_q, spec)
    values = (
        scalars | estimated_calibration(log_q_cal, ev.cal_y, spec) | truth | {"loss": jnp.asarray(loss, jnp.float32)}
    )
    if spec.kl_split:
        density |= split_bins(ev, truth["split"], density["mass"])
    else:
        density |= {k + "_mean": jnp.full_like(density["mass"], jnp.nan) for k in SPLIT}
    return Evaluation(_pick(Scalars, values), _pick(DensityBins, density), _pick(ReliabilityBins, values))


def fit_temperature(log_q: jax.Array, y: jax.Array, iterations: int = 40) -> jax.Array:
    """T minimising the NLL of softmax(log q / T) on a labelled sample (S, M), (S,).

    The NLL is convex in b = 1/T (a log-sum-exp of a linear function of b minus a linear one), so its
    derivative mean(E_{q_b}[log q] - log q_y) is increasing in b: its zero is found by bisection on
    log b in [-7, 7] (T from 1e-3 to 1e3; the bounds where it has none, e.g. a sample the model
    separates perfectly)."""
    z_y = jnp.take_along_axis(log_q, y[:, None], axis=-1)[:, 0]

    def slope(log_b):
        q = jax.nn.softmax(jnp.exp(log_b) * log_q)
        return jnp.mean(jnp.sum(q * log_q, axis=-1) - z_y)

    lo, hi = bisect(lambda mid: slope(mid) < 0, jnp.float32(-7.0), jnp.float32(7.0), iterations)
    return jnp.exp(-0.5 * (lo + hi))


def recalibrate(ev: EvalSet, log_q: jax.Array, log_q_cal: jax.Array, spec: EvalSpec) -> Recalibrated:
    """The checkpoint's errors after temperature scaling fitted on the run's labelled sample."""
    t = fit_temperature(log_q_cal, ev.cal_y)
    scaled = jax.nn.log_softmax(log_q / t)
    scalars, _ = errors(ev, scaled)
    return _pick(Recalibrated, scalars | true_calibration(ev, scaled, spec) | {"temperature": t})
