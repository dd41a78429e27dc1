"""True calibration from level sets on a 1-D grid: the curve m(c) = E[target | score = c] and
the expectations over it, exactly, in O(G log G).

Used by ``metrics.true_calibration`` (top label: levels of the confidence; for two classes also
the split of kl by the level sets of q_1) and the estimators' class-wise target
(``class_calibration_error``: levels of one class's score). Tested against independent float64
references (tests/truth_reference.py) within 0.1 % at the default grid.
"""

from __future__ import annotations

import functools
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
    """-log(1 - conf) from log conf, capped at LEVEL_CAP. A log-softmax compiled into a larger
    program can round the top class's log q to just above 0 (log q / T of a confident model, T < 1):
    read as conf = 1 (the cap), not the NaN of -log(1 - e^(positive))."""
    return jnp.minimum(-jnp.log(-jnp.expm1(jnp.minimum(log_conf, 0.0))), LEVEL_CAP)


def level_set_terms(log_q: jax.Array, p: jax.Array, w: jax.Array, split: bool = False) -> dict[str, jax.Array]:
    """true_ece, cal_term and grouping_term of the top label on a 1-D grid (G,), from the level sets
    of the confidence (``level_set_integrals``), and the top label's split as Bernoulli
    distributions: ``kl_cal_top`` = E KL(m(conf) || conf), ``kl_group_top`` = E KL(P_top || m(conf)),
    with their values per grid point (G,) under ``..._points`` (``per_point``), where ``split``."""
    return _terms(_reduced(level_set_integrals(*top_label_halves(log_q, p, w), top=True, split=split)), "_top")


def binary_level_sets(log_q: jax.Array, p: jax.Array, w: jax.Array) -> dict[str, jax.Array]:
    """``level_set_terms`` of a two-class model (G, 2), and the split of kl itself by the level sets
    of q_1 (``class_halves``): ``kl_cal`` = E KL(m(q_1) || q_1) and ``kl_group`` = E KL(P_1 || m(q_1)),
    and per grid point under ``..._points``. q is a function of q_1, so m(q_1) = E[P_1 | q_1] is the
    best any recalibration of q can do and E KL(P || q) = E KL(P || m) + E KL(m || q) exactly (the
    cross term vanishes on every level set): kl_cal is what an ideal recalibrator would remove,
    kl_group what none can.
    Both level sets are solved as one batch of two (one compiled solve, not two), each reduced on
    its own (a sum over a batch is compiled differently for different CPUs)."""
    both = jax.tree.map(
        lambda a, b: jnp.stack([a, b]), top_label_halves(log_q, p, w), class_halves(log_q[:, 1], p[:, 1], w)
    )
    out = jax.vmap(functools.partial(level_set_integrals, split=True))(*both, top=jnp.array([True, False]))
    top, cls = (_reduced(jax.tree.map(lambda v, i=i: v[i], out)) for i in range(2))
    return _terms(top, "_top") | {k: cls[k] for k in ("kl_cal", "kl_group", "kl_cal_points", "kl_group_points")}


def _terms(out: dict, suffix: str) -> dict[str, jax.Array]:
    names = [k for k in ("kl_cal", "kl_group", "kl_cal_points", "kl_group_points") if k in out]
    return {k: out[k] for k in ("true_ece", "cal_term", "grouping_term")} | {
        k.replace("kl_cal", "kl_cal" + suffix).replace("kl_group", "kl_group" + suffix): out[k] for k in names
    }


def top_label_halves(log_q: jax.Array, p: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    """The pieces ("halves") of ``level_set_integrals`` for the top label of a model (G, M) on a 1-D
    grid: levels u = -log(1 - conf) (``confidence_level``), whose level sets are those of conf.

    Between neighbouring grid points log q and P are taken as linear in x. A segment whose two
    ends predict different classes is split where the prediction changes (there P_top jumps from
    one class's probability to the other's), any other segment at its middle, so each half carries
    one predicted class and P_top runs linearly along it. Halves are ordered as ``per_point`` reads
    them: the right halves of points 0 .. G-2, then the left halves of points 1 .. G-1.
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
    return (
        jnp.concatenate([level[:-1], mid_level]),
        jnp.concatenate([mid_level, level[1:]]),
        jnp.concatenate([p_top[:-1], p_right]),
        jnp.concatenate([p_left, p_top[1:]]),
        jnp.concatenate([t * mass, (1 - t) * mass]),
    )


def class_halves(log_s: jax.Array, p: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    """The halves for one class's score s = q_c (G,) and its P_c: levels in logit q_c, computed from
    log q_c; each segment split at its middle (a single class's score has no prediction to flip)."""
    level = jnp.clip(log_s - jnp.log(-jnp.expm1(jnp.minimum(log_s, -1e-30))), -LEVEL_CAP, LEVEL_CAP)
    mid, p_mid = 0.5 * (level[:-1] + level[1:]), 0.5 * (p[:-1] + p[1:])
    half = 0.25 * (w[:-1] + w[1:])
    return (
        jnp.concatenate([level[:-1], mid]),
        jnp.concatenate([mid, level[1:]]),
        jnp.concatenate([p[:-1], p_mid]),
        jnp.concatenate([p_mid, p[1:]]),
        jnp.concatenate([half, half]),
    )


def class_calibration_error(log_s: jax.Array, p: jax.Array, w: jax.Array) -> jax.Array:
    """E |m(s) - s| for one class's score s = q_c on a 1-D grid (G,), m(s) = E[P_c | q_c = s]: the
    class-wise calibration error, from the level sets of q_c (``class_halves``)."""
    return 0.5 * jnp.sum(level_set_integrals(*class_halves(log_s, p, w), top=False)["true_ece"])


def level_set_integrals(start, end, p_start, p_end, half_mass, top, split: bool = False) -> dict[str, jax.Array]:
    """E |m(u) - c(u)|, E (m - c)^2 and E (m - P)^2 over pieces ("halves") on which the level runs
    linearly from ``start`` to ``end`` and the target P from ``p_start`` to ``p_end``, each holding
    ``half_mass``; m(u) = E[P | level = u] and c the score at level u: the confidence 1 - exp(-u)
    where ``top``, else sigmoid(u). Returned unreduced (``_reduced`` sums them): twice each
    interval's contribution to the three expectations; with ``split``, also to E KL(m || c) and to
    the terms that give E KL(P || m) (``_reduced``), and per half, at its middle level, the split's
    values ``kl_cal_points`` = KL(m || c) and ``kl_group_points`` = KL(P || m) (Bernoulli).

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
    ece = cal = grouping = kl_cal = info_m = 0.0
    for g in _GAUSS:
        u = key[:-1] + g * width
        n = a + b * u
        m = jnp.where(live, n / jnp.where(live, d, 1.0), 0.0)
        c, c_bar = _score(u, top)
        gap = m - c
        ece = ece + d * jnp.abs(gap) * width
        cal = cal + d * gap**2 * width
        grouping = grouping + jnp.maximum((c2 + 2.0 * e2 * u + f2 * u * u) - n * m, 0.0) * width
        if split:
            kl_cal = kl_cal + d * bernoulli_kl(jnp.clip(m, 0.0, 1.0), c, c_bar) * width
            info_m = info_m + d * _information(jnp.clip(m, 0.0, 1.0)) * width
    out = {"true_ece": ece, "cal_term": cal, "grouping_term": grouping}
    if not split:
        return out
    # E i(P), half by half: P runs linearly along each
    info_p = 0.5 * half_mass * sum(_information(jnp.clip(p_start + g * (p_end - p_start), 0.0, 1.0)) for g in _GAUSS)
    # m at each half's middle level (a flat half: its level), from the interval holding it: the
    # half itself is crossed there, so it is live unless rounding emptied it (then the half's own
    # P stands for m).
    u = 0.5 * (start + end)
    p_mid = jnp.clip(0.5 * (p_start + p_end), 0.0, 1.0)
    at = active[jnp.clip(jnp.searchsorted(key, u, side="right") - 1, 0, key.shape[0] - 2)]
    known = at[:, 0] > 0
    m = jnp.clip(jnp.where(known, (at[:, 1] + at[:, 2] * u) / jnp.where(known, at[:, 0], 1.0), p_mid), 0.0, 1.0)
    c, c_bar = _score(u, top)
    return out | {
        "kl_cal": kl_cal,
        "info_m": info_m,
        "info_p": info_p,
        "kl_cal_points": bernoulli_kl(m, c, c_bar),
        "kl_group_points": kl_to_estimate(p_mid, m),
        "half_mass": half_mass,
    }


def _reduced(out: dict) -> dict[str, jax.Array]:
    """The expectations of ``level_set_integrals`` summed, and its split per grid point.

    kl_cal = E KL(m || c) is an integral over the levels like the others. kl_group = E KL(P || m)
    is not (KL is not linear in P), but on a level set E[P] = m turns it into E i(P) - E i(m),
    i(p) = KL(p || 1/2) = log 2 - h(p) (h the binary entropy): the first over the halves, the second
    over the levels (within rounding of 0 where m = P, e.g. a tempered posterior; negative rounding
    is clipped)."""
    terms = {k: 0.5 * jnp.sum(out[k]) for k in ("true_ece", "cal_term", "grouping_term")}
    if "kl_cal" not in out:
        return terms
    kl_group = jnp.sum(out["info_p"]) - 0.5 * jnp.sum(out["info_m"])
    return terms | {
        "kl_cal": 0.5 * jnp.sum(out["kl_cal"]),
        "kl_group": jnp.maximum(kl_group, 0.0),
        "kl_cal_points": per_point(out["kl_cal_points"], out["half_mass"]),
        "kl_group_points": per_point(out["kl_group_points"], out["half_mass"]),
    }


def _information(p: jax.Array) -> jax.Array:
    """KL(Bernoulli(p) || Bernoulli(1/2)) = log 2 - h(p), through ``bernoulli_kl``'s logs: the
    entropy's own form, -p log p - ..., compiled into the training program, gave other bits on an
    AVX2 CPU than on an AVX-512 one (tests/test_portability.py), these the same."""
    half = jnp.full_like(p, 0.5)
    return bernoulli_kl(p, half, half)


def _score(u: jax.Array, top) -> tuple[jax.Array, jax.Array]:
    """(c, 1 - c) at level u: the confidence 1 - exp(-u) where ``top`` (a bool, or an array of them
    under vmap), else the class score sigmoid(u); 1 - c computed as such, exact near c = 1."""
    if isinstance(top, bool):
        return (-jnp.expm1(-u), jnp.exp(-u)) if top else (jax.nn.sigmoid(u), jax.nn.sigmoid(-u))
    return (
        jnp.where(top, -jnp.expm1(-u), jax.nn.sigmoid(u)),
        jnp.where(top, jnp.exp(-u), jax.nn.sigmoid(-u)),
    )


def per_point(half_values: jax.Array, half_mass: jax.Array) -> jax.Array:
    """(G,) from values on the 2(G - 1) halves in the order the builders above give them (the right
    halves of points 0 .. G-2, then the left halves of points 1 .. G-1): each point's mass-weighted
    mean over its halves, the value that stands for its quadrature cell, so that sum_i w_i f_i is
    the same quadrature as kl's and the density bins split it by their shares of the cell."""
    n = half_values.shape[0] // 2
    zero = jnp.zeros((1,), half_values.dtype)
    weighted = half_mass * half_values
    mass = jnp.concatenate([half_mass[:n], zero]) + jnp.concatenate([zero, half_mass[n:]])
    total = jnp.concatenate([weighted[:n], zero]) + jnp.concatenate([zero, weighted[n:]])
    return jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), 0.0)


def bernoulli_kl(a: jax.Array, b: jax.Array, b_bar: jax.Array) -> jax.Array:
    """KL(Bernoulli(a) || Bernoulli(b)), with 1 - b given as ``b_bar`` (exact near b = 1):
    a log(a / b) + (1 - a) log((1 - a) / (1 - b)), each log from the difference d = a - b through
    log1p(d / b) where a is near b (where the logs of a and b would cancel to noise), else as
    ``_log``(a) - ``_log``(b) (where 1 + d / b would round: a far below b)."""
    d = a - b
    a_bar = b_bar - d

    def term(x, y, dx):
        near = jnp.abs(dx) <= 0.5 * y
        ratio = jnp.where(near, jnp.log1p(dx / jnp.where(y > 0, y, 1.0)), _log(x) - _log(y))
        return jnp.where(x > 0, x * ratio, 0.0)

    return jnp.maximum(term(a, b, d) + term(a_bar, b_bar, -d), 0.0)


def kl_to_estimate(p: jax.Array, m: jax.Array) -> jax.Array:
    """KL(Bernoulli(p) || Bernoulli(m)) for an m that stands for E[P | q] at a point (a half's
    middle, a Monte-Carlo group's mean): m kept within [1e-12, 1 - 2^-24], since an m rounded to 0
    or 1 beside a P that is not would make the point's KL infinite."""
    m = jnp.clip(m, 1e-12, 1.0 - 2.0**-24)
    return bernoulli_kl(p, m, 1.0 - m)


def _log(x: jax.Array) -> jax.Array:
    """log x from its binary exponent and log1p of its mantissa less 1 (exact: the mantissa is in
    [1/2, 1)): the split's logs are all log1p, whose bits are the same on AVX2 and AVX-512 CPUs
    inside the compiled program (the entropy's -p log p, compiled there, was not:
    tests/test_portability.py)."""
    mantissa, exponent = jnp.frexp(x)
    return jnp.log1p(mantissa - 1.0) + exponent.astype(mantissa.dtype) * LN2


LN2 = 0.6931471805599453  # ln 2, correctly rounded (a literal: no library's log decides its bits)


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
