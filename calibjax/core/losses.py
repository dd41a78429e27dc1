"""Training losses and their population optima: which choices keep the posterior?

A loss l(q, y) trained to its minimum on infinite data gives, at each x, the q*(x) that minimises the
conditional risk sum_c P(c|x) l(q, c). For a strictly proper scoring rule q* = P(C|x); for the others
q* is a known function of P, so a trained network can be measured against both the posterior
(``kl``) and its loss's own optimum (``kl_to_optimum`` = E KL(q* || q)).

==================  ===============================================  =================================
loss                l(q, y), q = softmax(logits)                     population optimum q*(x)
==================  ===============================================  =================================
cross_entropy       -log q_y                                         P (strictly proper)
brier               sum_c (q_c - [c = y])^2                          P (strictly proper; Brier 1950)
label_smoothing     -sum_c t_c log q_c, t = (1 - a) onehot(y) + a/M  (1 - a) P + a / M
                    (Szegedy et al. 2016; ``label_smoothing`` = a)
focal               -(1 - q_y)^g log q_y                             P_c proportional to h_g(q*_c),
                    (Lin et al. 2017; ``focal_gamma`` = g)           h_g(v) = v / ((1 - v)^(g - 1)
                                                                     ((1 - v) - g v log v))
==================  ===============================================  =================================

The focal optimum: the conditional risk sum_c P_c l(q_c) on the simplex has its minimum where
P_c (-l'(q_c)) is the same for every c, with -l'(v) = (1 - v)^g / v - g (1 - v)^(g - 1) log v, so
P_c is proportional to h_g(q*_c) = 1 / (-l'(q*_c)) (Charoenphakdee, Vongkulbhisal, Chairatanakul &
Sugiyama 2021, "On focal loss for class-posterior probability estimation", CVPR, their
transformation Psi^g). h_g increases from 0 to infinity on (0, 1) for g >= 0, so q* is found by
inverting it: q*_c = h_g^-1(t P_c) with t such that the q*_c sum to 1 (nested bisections in log
space, once per run). With g > 0, q* is less confident than P (focal loss underfits confidence),
which is the calibration effect Mukhoti et al. (2020) observed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from calibjax.core.bisection import bisect

LOSSES = ("cross_entropy", "brier", "label_smoothing", "focal")
FOCAL_MAX_GAMMA = 10.0
_BISECTIONS = 60


def loss_values(
    name: str, logits: jax.Array, labels: jax.Array, label_smoothing: jax.Array, focal_gamma: jax.Array
) -> jax.Array:
    """Per-example training loss (B,) of logits (B, M) and integer labels (B,)."""
    if name == "cross_entropy":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    m = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, m, dtype=logits.dtype)
    if name == "brier":
        return jnp.sum((jax.nn.softmax(logits) - onehot) ** 2, axis=-1)
    if name == "label_smoothing":
        return optax.softmax_cross_entropy(logits, (1.0 - label_smoothing) * onehot + label_smoothing / m)
    if name == "focal":
        log_q = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        # (1 - q)^g from log q without rounding 1 - q; 0^0 = 1 (g = 0 is cross-entropy)
        weight = jnp.exp(focal_gamma * jnp.log(-jnp.expm1(jnp.minimum(log_q, -1e-30))))
        return -weight * log_q
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


def _log_h(v: jax.Array, gamma: jax.Array) -> jax.Array:
    """log h_g(v) (see the module docstring), for v in (0, 1)."""
    return jnp.log(v) - (gamma - 1.0) * jnp.log1p(-v) - jnp.log((1.0 - v) - gamma * v * jnp.log(v))


def _focal_inverse(log_target: jax.Array, gamma: jax.Array) -> jax.Array:
    """v in (0, 1) with log h_g(v) = log_target, by bisection on logit v (h_g is increasing)."""

    below = lambda mid: _log_h(jax.nn.sigmoid(mid), gamma) < log_target  # noqa: E731
    lo, hi = bisect(below, jnp.full_like(log_target, -40.0), jnp.full_like(log_target, 40.0), _BISECTIONS)
    return jax.nn.sigmoid(0.5 * (lo + hi))


def focal_optimum(p: jax.Array, gamma: jax.Array) -> jax.Array:
    """q* (..., M) of focal loss for posteriors p (..., M): q*_c = h_g^-1(t p_c), sum_c q*_c = 1."""
    log_p = jnp.log(jnp.maximum(p, 1e-30))

    def total(log_t):
        return jnp.sum(_focal_inverse(log_p + log_t[..., None], gamma), axis=-1)

    shape = p.shape[:-1]
    lo, hi = bisect(lambda mid: total(mid) < 1.0, jnp.full(shape, -60.0), jnp.full(shape, 60.0), _BISECTIONS)
    q = _focal_inverse(log_p + (0.5 * (lo + hi))[..., None], gamma)
    return q / jnp.sum(q, axis=-1, keepdims=True)


def log_optimum(name: str, log_post: jax.Array, label_smoothing: jax.Array, focal_gamma: jax.Array) -> jax.Array:
    """log q*(x) (..., M): the population minimiser of the loss at each x, from log P(C|x)."""
    if name in ("cross_entropy", "brier"):
        return log_post
    p = jnp.exp(log_post)
    if name == "label_smoothing":
        m = log_post.shape[-1]
        return jnp.log((1.0 - label_smoothing) * p + label_smoothing / m)
    if name == "focal":
        return jnp.log(focal_optimum(p, focal_gamma))
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")
