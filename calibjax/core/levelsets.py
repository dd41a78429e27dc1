"""True calibration from level sets on a 1-D grid: the curve m(c) = E[target | score = c] and
the expectations over it, exactly, in O(G log G).

Used by ``metrics.true_calibration`` (top label: levels of the confidence) and the estimators'
class-wise target (``class_calibration_error``: levels of one class's score). Tested against two
independent float64 references (tests/truth_reference.py) within 0.1 % at the default grid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

FLAT = 1e-6  # level differences below this count as a flat segment (a point mass at its level)
STEEP = 1e-3  # halves spanning less than this in level use their mean P_top (see level_set_terms)
LEVEL_CAP = 30.0  # levels -log(1 - conf) above this (1 - conf < 1e-13) are one level: float32 saturation
# float32 words per grid point that the level-set integrals hold at once (for planning.memory):
# 4 events of 6 compensated sums, their key and order, doubled for the scan's intermediates
LEVEL_SET_WORDS = 4 * (2 * 6 + 2) * 2
_GAUSS = (0.5 - 0.5 / math.sqrt(3.0), 0.5 + 0.5 / math.sqrt(3.0))  # 2-point Gauss-Legendre nodes on [0, 1]


def confidence_level(log_q: jax.Array) -> jax.Array:
    """-log(1 - conf), from log q without rounding 1 - conf: the coordinate in which the true
    calibration curve is solved. It resolves confidences near 1, where most of the mass of a
    well-separated task sits and where m(c) - c changes fastest (e.g. like sqrt(1 - c) for an
    overconfident model)."""
    return _level(jnp.max(log_q, axis=-1))


def _level(log_conf: jax.Array) -> jax.Array:
    return jnp.minimum(-jnp.log(-jnp.expm1(log_conf)), LEVEL_CAP)


def level_set_terms(log_q: jax.Array, p: jax.Array, w: jax.Array) -> dict[str, jax.Array]:
    """true_ece, cal_term and grouping_term of the top label on a 1-D grid (G,), from the level sets
    of the confidence (``level_set_integrals``).

    Levels are u = -log(1 - conf) (``confidence_level``), whose level sets are those of conf.
    Between neighbouring grid points log q and P are taken as linear in x. A segment whose two
    ends predict different classes is split where the prediction changes (there P_top jumps from
    one class's probability to the other's), any other segment at its middle, so each half carries
    one predicted class and P_top runs linearly along it.
    """
    top = jnp.max(log_q, axis=-1)
    pred = jnp.argmax(log_q, axis=-1)
    level = confidence_level(log_q)
    p_top = jnp.take_along_axis(p, pred[:, None], axis=-1)[:, 0]
    pick = lambda v, k: jnp.take_along_axis(v, k[:, None], axis=-1)[:, 0]  # noqa: E731
    pa, pb = pred[:-1], pred[1:]
    # Where the prediction changes: the log-odds of class pa against pb, linear in x, crosses 0.
    da = top[:-1] - pick(log_q[:-1], pb)
    db = pick(log_q[1:], pa) - top[1:]
    switch = pa != pb
    t = jnp.where(switch, da / jnp.where(switch, da - db, 1.0), 0.5)
    lq_mid = (1 - t) * top[:-1] + t * pick(log_q[1:], pa)
    mid_level = jnp.where(switch, _level(lq_mid), 0.5 * (level[:-1] + level[1:]))
    p_left = (1 - t) * p_top[:-1] + t * pick(p[1:], pa)  # P of class pa at the split
    p_right = (1 - t) * pick(p[:-1], pb) + t * p_top[1:]  # P of class pb at the split
    mass = 0.5 * (w[:-1] + w[1:])
    return level_set_integrals(
        jnp.concatenate([level[:-1], mid_level]),
        jnp.concatenate([mid_level, level[1:]]),
        jnp.concatenate([p_top[:-1], p_right]),
        jnp.concatenate([p_left, p_top[1:]]),
        jnp.concatenate([t * mass, (1 - t) * mass]),
        lambda u: -jnp.expm1(-u),  # conf = 1 - exp(-u)
    )


def class_calibration_error(log_s: jax.Array, p: jax.Array, w: jax.Array) -> jax.Array:
    """E |m(s) - s| for one class's score s = q_c on a 1-D grid (G,), m(s) = E[P_c | q_c = s]: the
    class-wise calibration error, from the level sets of q_c as in ``level_set_terms`` (levels in
    logit q_c, computed from log q_c; no split, as a single class's score has no prediction to flip)."""
    level = jnp.clip(log_s - jnp.log(-jnp.expm1(jnp.minimum(log_s, -1e-30))), -LEVEL_CAP, LEVEL_CAP)
    mid, p_mid = 0.5 * (level[:-1] + level[1:]), 0.5 * (p[:-1] + p[1:])
    half = 0.25 * (w[:-1] + w[1:])
    return level_set_integrals(
        jnp.concatenate([level[:-1], mid]),
        jnp.concatenate([mid, level[1:]]),
        jnp.concatenate([p[:-1], p_mid]),
        jnp.concatenate([p_mid, p[1:]]),
        jnp.concatenate([half, half]),
        jax.nn.sigmoid,
    )["true_ece"]


def level_set_integrals(start, end, p_start, p_end, half_mass, conf_of) -> dict[str, jax.Array]:
    """E |m(u) - c(u)|, E (m - c)^2 and E (m - P)^2 over pieces ("halves") on which the level runs
    linearly from ``start`` to ``end`` and the target P from ``p_start`` to ``p_end``, each holding
    ``half_mass``; c = ``conf_of``(u) is the score at level u and m(u) = E[P | level = u].

    A half spreads its mass evenly over its levels: density (its mass) / |its change of u| per
    unit of u, the coarea formula p(x) / |u'(x)|. Sorted, the halves' ends cut the level axis into
    intervals on each of which the same halves are crossed, so the sums over them are constant:
    the density D, N(u) = sum density x P(u) (linear in u) and sum density x P(u)^2 (quadratic).
    There m = N / D exactly (every crossing of u with its true weight, whatever the grid spacing),
    and the expectations are integrals over u of D |m - c|, D (m - c)^2 and the within-level
    variance sum density (P - m)^2, each summed interval by interval (2-point Gauss-Legendre:
    exact for the variance, within rounding for smooth c). The sums are running sums over the
    sorted ends, compensated (``_compensated_cumsum``): each holds the sum of every half started
    below u less every half finished, which in float32 would cancel to noise. Sorting makes it
    O(G log G), where solving at fixed levels was levels x G (and capped the accuracy at about 1 %:
    ``docs/findings.md``). A flat half (a constant q, or float32 saturation) is widened to +-FLAT
    around its level: a point mass there, which outweighs the crossings, as in the continuum.
    """
    span = end - start
    flat = jnp.abs(span) <= FLAT
    lo = jnp.minimum(start, end) - jnp.where(flat, FLAT, 0.0)
    hi = jnp.maximum(start, end) + jnp.where(flat, FLAT, 0.0)
    density = half_mass / (hi - lo)
    # P along a half, P(u) = q0 + slope u; slopes of halves shorter than STEEP in u are dropped
    # (their mean P stands for them), which bounds the rounding of q0 = P - slope u.
    sloped = jnp.abs(span) > STEEP
    slope = jnp.where(sloped, (p_end - p_start) / jnp.where(sloped, span, 1.0), 0.0)
    q0 = 0.5 * (p_start + p_end) - 0.5 * (start + end) * slope
    sums = jnp.stack(
        [density, density * q0, density * slope, density * q0 * q0, density * q0 * slope, density * slope**2], -1
    )
    order = jnp.argsort(jnp.concatenate([lo, hi]))
    key = jnp.concatenate([lo, hi])[order]
    events = jnp.concatenate([sums, -sums])[order]
    total, error = _compensated_cumsum(events)
    crossed = jnp.cumsum(jnp.concatenate([jnp.ones_like(lo, jnp.int32), -jnp.ones_like(hi, jnp.int32)])[order])
    # On interval k, from key[k] to key[k + 1], the halves started and not finished by key[k] are crossed.
    active = (total + error)[:-1]
    width = key[1:] - key[:-1]
    live = (crossed[:-1] > 0) & (width > 0) & (active[:, 0] > 0)
    d, a, b, c2, e2, f2 = (jnp.where(live, active[:, i], 0.0) for i in range(6))
    width = jnp.where(live, width, 0.0)
    ece = cal = grouping = 0.0
    for g in _GAUSS:
        u = key[:-1] + g * width
        n = a + b * u
        m = jnp.where(live, n / jnp.where(live, d, 1.0), 0.0)
        gap = m - conf_of(u)
        ece = ece + d * jnp.abs(gap) * width
        cal = cal + d * gap**2 * width
        grouping = grouping + jnp.maximum((c2 + 2.0 * e2 * u + f2 * u * u) - n * m, 0.0) * width
    return {"true_ece": 0.5 * jnp.sum(ece), "cal_term": 0.5 * jnp.sum(cal), "grouping_term": 0.5 * jnp.sum(grouping)}


def _compensated_cumsum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Running sums along axis 0 as (sum, error) pairs whose sum holds them to about float32^2
    relative to the magnitudes summed: a parallel prefix sum whose every addition keeps its
    rounding error (Knuth's TwoSum, exact in IEEE arithmetic: XLA does not reassociate floats)."""

    def combine(left, right):
        s = left[0] + right[0]
        back = s - left[0]
        rounding = (left[0] - (s - back)) + (right[0] - back)
        return s, (left[1] + right[1]) + rounding

    return jax.lax.associative_scan(combine, (x, jnp.zeros_like(x)), axis=0)
