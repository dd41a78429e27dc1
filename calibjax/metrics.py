"""Metrics against the exact posterior.

Every expectation over x ~ p(x) is a weighted sum over an evaluation set:
in 1-D a midpoint quadrature on a uniform grid covering every component's
mean +- ``grid_sigmas`` sigma (mass outside is below 1e-15 at 8 sigma), with
weights p(x_i) dx renormalised to sum to one; for D > 1 a fixed Monte-Carlo
sample from p(x) (the same sample for every run of a task, whatever its seed)
with weights 1/S. The set depends only on the task, so it is built once per
run, outside the step loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from calibjax import tasks

LOG10_E = 1.0 / math.log(10.0)
EVAL_SEED = 20250428  # the fixed Monte-Carlo evaluation sample (D > 1) comes from this key


@dataclass(frozen=True)
class EvalSpec:
    """Static evaluation settings (they fix array shapes)."""

    points: int = 2048                 # grid points (D = 1) or Monte-Carlo samples (D > 1)
    grid_sigmas: float = 8.0           # 1-D grid half-width around each component, in sigmas
    hdr_mass: float = 0.999            # max_err is taken over the densest region holding this mass
    density_edges: tuple[float, ...] = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0)

    @property
    def num_bins(self) -> int:
        return len(self.density_edges) + 1

    def bin_bounds(self) -> tuple[list[float], list[float]]:
        """(lo, hi) of each log10-density bin; the outer bins are open (-inf, inf)."""
        edges = list(self.density_edges)
        return [-math.inf] + edges, edges + [math.inf]


class EvalSet(NamedTuple):
    x: jax.Array              # (G, D) evaluation points
    weight: jax.Array         # (G,) probability mass of each point; sums to 1
    log_post: jax.Array       # (G, M) exact log P(c | x)
    log10_density: jax.Array  # (G,) log10 p(x)
    in_hdr: jax.Array         # (G,) bool, inside the densest region holding hdr_mass
    bins: jax.Array           # (G, NB) float32 one-hot of the log10-density bin


def eval_points(task: tasks.GaussianTask, spec: EvalSpec) -> tuple[jax.Array, jax.Array]:
    """Evaluation points (G, D) and their unnormalised weights (G,)."""
    if task.dim == 1:
        lo, hi = tasks.support_range(task, spec.grid_sigmas)
        dx = (hi - lo) / spec.points
        x = lo[None, :] + dx[None, :] * (jnp.arange(spec.points, dtype=jnp.float32)[:, None] + 0.5)
        logd = jax.vmap(tasks.log_density, (None, 0))(task, x)
        return x, jnp.exp(logd - jnp.max(logd))
    keys = jax.random.split(jax.random.key(EVAL_SEED), spec.points)
    x, _ = jax.vmap(tasks.sample, (None, 0))(task, keys)
    return x, jnp.ones((spec.points,), jnp.float32)


def make_eval_set(task: tasks.GaussianTask, spec: EvalSpec) -> EvalSet:
    x, w = eval_points(task, spec)
    weight = w / jnp.sum(w)
    log_post = jax.vmap(tasks.log_posterior, (None, 0))(task, x)
    log10_density = jax.vmap(tasks.log_density, (None, 0))(task, x) * LOG10_E
    # Densest-first cumulative mass: a point is in the region if the mass denser than it is < hdr_mass.
    order = jnp.argsort(-log10_density)
    mass_before = jnp.cumsum(weight[order]) - weight[order]
    in_hdr = jnp.zeros_like(weight, dtype=bool).at[order].set(mass_before < spec.hdr_mass)
    edges = jnp.asarray(spec.density_edges, jnp.float32)
    bin_index = jnp.searchsorted(edges, log10_density, side="left")  # bin i = (edge[i-1], edge[i]]
    bins = jax.nn.one_hot(bin_index, spec.num_bins, dtype=jnp.float32)
    return EvalSet(x, weight, log_post, log10_density, in_hdr, bins)


def pointwise_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(P || q) along the last axis; terms with P = 0 contribute 0 (not 0 * inf = nan)."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def conditional_entropy(ev: EvalSet) -> jax.Array:
    """H(C | X) in nats: the Bayes cross-entropy, the floor of the expected training loss."""
    p = jnp.exp(ev.log_post)
    return -jnp.sum(ev.weight * jnp.sum(jnp.where(p > 0, p * ev.log_post, 0.0), axis=-1))


def evaluate(ev: EvalSet, log_q: jax.Array) -> dict[str, jax.Array]:
    """Errors of a model's log q(c | x_i) (G, M) against the exact posterior.

    Returns scalars kl, tv, max_err, accuracy, bayes_accuracy and per-bin arrays
    bin_mass, bin_kl (each bin's contribution, summing to kl), bin_max_err
    (nan for an empty bin).
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
    return {
        "kl": jnp.sum(ev.weight * kl_i),
        "tv": jnp.sum(ev.weight * 0.5 * jnp.sum(abs_err, axis=-1)),
        "max_err": jnp.max(jnp.where(ev.in_hdr, err_i, 0.0)),
        "accuracy": jnp.sum(ev.weight * p_chosen),
        "bayes_accuracy": jnp.sum(ev.weight * jnp.max(p, axis=-1)),
        "bin_mass": ev.weight @ ev.bins,
        "bin_kl": (ev.weight * kl_i) @ ev.bins,
        "bin_max_err": jnp.where(jnp.any(in_bin, axis=0), bin_max, jnp.nan),
    }
