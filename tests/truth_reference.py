"""An independent, float64 reference for true calibration on two-class 1-D Gaussian tasks.

For a model whose class-1 probability is q1(x) = sigmoid(a z(x) + b), with z(x) = log P(1|x)/P(2|x)
the exact log-odds (a quadratic in x), every level set {x : conf(x) = c} is found in closed form:
conf = c means a z + b = +-logit(c), so z(x) = z0, a quadratic equation in x. By the coarea formula
the crossings weigh p(x_j) / |conf'(x_j)|, and conf' = c (1 - c) |a z'(x_j)|, whose c (1 - c) |a| is
common to all crossings of one level; so m(c) = sum_j p(x_j) P_top(x_j) / |z'(x_j)| / sum_j p / |z'|.
The outer expectation over x is a trapezoid rule on 400,001 points over +-12 sigma. No grid of
confidences, no bins: nothing shared with calibjax.core.metrics but the definitions.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import integrate, optimize, special


def _log_normal(x, mu, s):
    return -0.5 * ((x - mu) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)


def true_calibration(prior, mu, sigma, a: float, b: float) -> dict[str, float]:
    """true_ece, cal_term, grouping_term of q1 = sigmoid(a z + b) on the task (prior, mu, sigma) (2 each)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # levels without real roots give nan, masked below
        return _true_calibration(prior, mu, sigma, a, b)


def _true_calibration(prior, mu, sigma, a, b):
    (p1, p2), (m1, m2), (s1, s2) = prior, mu, sigma
    lo = min(m1 - 12 * s1, m2 - 12 * s2)
    hi = max(m1 + 12 * s1, m2 + 12 * s2)
    x = np.linspace(lo, hi, 400_001)
    # z(x) = A x^2 + B x + C
    A = -0.5 / s1**2 + 0.5 / s2**2
    B = m1 / s1**2 - m2 / s2**2
    C = (np.log(p1) - np.log(s1) - 0.5 * m1**2 / s1**2) - (np.log(p2) - np.log(s2) - 0.5 * m2**2 / s2**2)
    z = A * x**2 + B * x + C
    density = p1 * np.exp(_log_normal(x, m1, s1)) + p2 * np.exp(_log_normal(x, m2, s2))
    post1 = special.expit(z)
    q1 = special.expit(a * z + b)
    pred1 = q1 >= 0.5
    conf = np.where(pred1, q1, 1 - q1)
    p_top = np.where(pred1, post1, 1 - post1)
    if a == 0:  # constant q: one level set, the whole line
        m = np.full_like(x, np.trapezoid(density * p_top, x) / np.trapezoid(density, x))
    else:
        m = np.empty_like(x)
        logit = np.abs(a * z + b)  # logit(conf), exact where conf rounds to 1
        num = np.zeros_like(x)
        den = np.zeros_like(x)
        for sign in (1.0, -1.0):  # q1 = conf (prediction 1) and q1 = 1 - conf (prediction 2)
            z0 = (sign * logit - b) / a
            for root in _roots(A, B, C - z0):
                zr = A * root**2 + B * root + C
                dens = p1 * np.exp(_log_normal(root, m1, s1)) + p2 * np.exp(_log_normal(root, m2, s2))
                weight = np.where(np.isfinite(root), dens / np.abs(2 * A * root + B), 0.0)
                top = special.expit(zr) if sign > 0 else 1 - special.expit(zr)
                num += weight * np.where(np.isfinite(root), top, 0.0)
                den += weight
        m[:] = num / den
    return _terms(x, density, m, conf, p_top, special.expit(-np.abs(a * z + b)))


def _terms(x, density, m, conf, p_top, conf_bar) -> dict[str, float]:
    """true_ece, cal_term and grouping_term, and the top label's KL split (Bernoulli: kl_cal_top =
    E KL(m || conf), kl_group_top = E KL(P_top || m)), from m, conf (1 - conf: ``conf_bar``, exact
    where conf rounds to 1) and P_top on the points x: trapezoid rule under the normalised density."""
    w = density / np.trapezoid(density, x)
    return {
        "true_ece": np.trapezoid(w * np.abs(m - conf), x),
        "cal_term": np.trapezoid(w * (conf - m) ** 2, x),
        "grouping_term": np.trapezoid(w * (m - p_top) ** 2, x),
        "kl_cal_top": np.trapezoid(w * bernoulli_kl(m, conf, conf_bar), x),
        "kl_group_top": np.trapezoid(w * bernoulli_kl(p_top, m), x),
    }


def bernoulli_kl(a, b, b_bar=None):
    """KL(Bernoulli(a) || Bernoulli(b)) in float64 (1 - b as ``b_bar`` where given: exact near 1)."""
    return special.rel_entr(a, b) + special.rel_entr(1 - a, 1 - b if b_bar is None else b_bar)


def binary_split(prior, mu, sigma, g) -> dict[str, float]:
    """kl = E KL(P || q) of a two-class model whose class-1 log-odds is a quadratic in x,
    logit q1(x) = g[0] x^2 + g[1] x + g[2] (so q1 may rise and fall), and its exact split by the
    level sets of q1: kl_cal = E KL(m || q1), kl_group = E KL(P1 || m), m(s) = E[P1 | q1 = s].
    Every level set {g(x) = g0} is the roots of a quadratic, each crossing weighing p(x) / |g'(x)|;
    the outer expectations are a trapezoid rule on 400,001 points over +-12 sigma (float64)."""
    _, (m1, m2), (s1, s2) = prior, mu, sigma
    lo, hi = min(m1 - 12 * s1, m2 - 12 * s2), max(m1 + 12 * s1, m2 + 12 * s2)
    x = np.linspace(lo, hi, 400_001)
    log_density, log_post = gaussian_task(prior, mu, sigma)
    density, post1 = np.exp(log_density(x)), np.exp(log_post(x)[:, 0])
    a2, a1, a0 = g
    level = a2 * x**2 + a1 * x + a0
    q1 = special.expit(level)
    num, den = np.zeros_like(x), np.zeros_like(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        for root in _roots(a2, a1, a0 - level):
            ok = np.isfinite(root)
            r = np.where(ok, root, 0.0)
            weight = np.where(ok, np.exp(log_density(r)) / np.abs(2 * a2 * r + a1), 0.0)
            num += weight * np.exp(log_post(r)[:, 0])
            den += weight
    m = num / den
    w = density / np.trapezoid(density, x)
    return {
        "kl": np.trapezoid(w * bernoulli_kl(post1, q1), x),
        "kl_cal": np.trapezoid(w * bernoulli_kl(m, q1), x),
        "kl_group": np.trapezoid(w * bernoulli_kl(post1, m), x),
    }


def _roots(A, B, C):
    """Real roots of A x^2 + B x + C = 0 (C an array); nan where there is none."""
    if A == 0:
        return [-C / B]
    disc = B**2 - 4 * A * C
    sq = np.sqrt(np.where(disc >= 0, disc, np.nan))
    return [(-B + sq) / (2 * A), (-B - sq) / (2 * A)]


def gaussian_task(prior, mu, sigma):
    """(log p(x), log P(c | x)) of a 1-D task with one Gaussian per class, as float64 functions of x (n,)."""
    prior, mu, sigma = (np.asarray(v, np.float64) for v in (prior, mu, sigma))

    def log_joint(x):
        return np.log(prior) + _log_normal(x[:, None], mu, sigma)

    def log_density(x):
        return special.logsumexp(log_joint(x), axis=-1)

    def log_post(x):
        j = log_joint(x)
        return j - special.logsumexp(j, axis=-1, keepdims=True)

    return log_density, log_post


def top_label_calibration(log_density, log_post, log_q, lo: float, hi: float, n: int = 400_001) -> dict[str, float]:
    """true_ece, cal_term, grouping_term of a model with any number of classes on a 1-D task, in float64,
    by another route than calibjax's (no events, no linear pieces): the line is cut into pieces on
    which the level u = -log(1 - conf) is strictly monotone and the prediction fixed, each running to
    the exact extremum of u or switch of the prediction that ends it. The level set of each of the n
    points is found on every piece by Newton's method on u(x) = u (started from the piece's inverse,
    interpolated), each crossing weighing p(x) / |u'(x)| (the coarea formula; u' by central
    differences), so m(u) = sum p / |u'| P_top / sum p / |u'| at each point's own level; the outer
    expectation is a trapezoid rule over the n points. ``log_q`` maps x (n,) to log q (n, M);
    [lo, hi] must hold all but a negligible mass of p(x). On two-class tasks it agrees with
    ``true_calibration`` (closed-form level sets) to 1e-8 relative."""
    x = np.linspace(lo, hi, n)
    u, pred = _level(log_q, x)
    lq, lp = log_q(x), log_post(x)
    rows = np.arange(n)
    conf, p_top = np.exp(lq[rows, pred]), np.exp(lp[rows, pred])
    slope = np.gradient(u, x)
    cut = np.flatnonzero((np.sign(slope[1:]) != np.sign(slope[:-1])) | (pred[1:] != pred[:-1])) + 1
    ends = [lo, *(_piece_end(log_q, x, i, pred) for i in cut), hi]
    num, den = np.zeros(n), np.zeros(n)
    h = 1e-6 * (hi - lo)
    for k, piece in enumerate(np.split(rows, cut)):
        if len(piece) < 2 or np.any(slope[piece] == 0):
            continue
        c, left, right = pred[piece[0]], ends[k], ends[k + 1]
        xp = np.concatenate([[left], x[piece], [right]])
        up = _level_of(log_q, xp, c)
        order = np.argsort(up)
        up, xp = up[order], xp[order]
        at = np.flatnonzero((u >= up[0]) & (u <= up[-1]))
        target = u[at]
        xs = np.interp(target, up, xp)
        for _ in range(4):
            d = (_level_of(log_q, xs + h, c) - _level_of(log_q, xs - h, c)) / (2 * h)
            xs = np.clip(xs - (_level_of(log_q, xs, c) - target) / np.where(d == 0, np.inf, d), left, right)
        d = np.abs(_level_of(log_q, xs + h, c) - _level_of(log_q, xs - h, c)) / (2 * h)
        weight = np.exp(log_density(xs)) / d
        num[at] += weight * np.exp(log_post(xs)[:, c])
        den[at] += weight
    m = num / den
    density = np.exp(log_density(x))
    return _terms(x, density, m, conf, p_top, np.exp(-u))


def _level_of(log_q, x, c):
    """u = -log(1 - q_c) at x: the level of class c's probability (the confidence where c is predicted)."""
    return -special.logsumexp(np.delete(log_q(x), c, axis=1), axis=-1)


def _level(log_q, x):
    """(u, prediction) at x: u = -log(1 - conf), from the other classes' log probabilities."""
    lq = log_q(x)
    pred = np.argmax(lq, axis=-1)
    others = np.where(np.arange(lq.shape[1])[None, :] == pred[:, None], -np.inf, lq)
    return -special.logsumexp(others, axis=-1), pred


def _piece_end(log_q, x, i, pred):
    """Where the piece ending before grid point i ends exactly: where the prediction switches from
    pred[i - 1] to pred[i] (a root of their log-odds), else the extremum of u near x[i]."""
    a, b = pred[i - 1], pred[i]
    if a != b:
        odds = lambda t: float(np.diff(log_q(np.array([t]))[0, [b, a]])[0])  # noqa: E731
        return optimize.brentq(odds, x[i - 1], x[i], xtol=1e-14)
    lo, hi = x[max(i - 2, 0)], x[min(i + 1, len(x) - 1)]
    rising = np.gradient(_level_of(log_q, x[max(i - 2, 0) : i + 2], a))[0] > 0  # then a maximum
    found = optimize.minimize_scalar(
        lambda t: (-1.0 if rising else 1.0) * _level_of(log_q, np.array([t]), a)[0],
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-12},
    )
    return found.x


def density_bins(prior, mu, sigma, edges, pointwise) -> tuple[np.ndarray, np.ndarray]:
    """(mass, integral of p x pointwise) of each log10-density bin (edge[b-1], edge[b]] of a 1-D task,
    over the bin's exact x-intervals: the points where log10 p(x) crosses an edge found by brentq,
    each interval integrated by adaptive quadrature. ``pointwise`` maps log P(c | x) (n, M) to (n,)."""
    log_density, log_post = gaussian_task(prior, mu, sigma)
    lo = min(m - 12 * s for m, s in zip(mu, sigma, strict=True))
    hi = max(m + 12 * s for m, s in zip(mu, sigma, strict=True))
    log10 = lambda t: log_density(np.atleast_1d(t))[0] / np.log(10)  # noqa: E731
    x = np.linspace(lo, hi, 200_001)
    level = log_density(x) / np.log(10)
    breaks = [lo, hi]
    for e in edges:
        for i in np.flatnonzero(np.sign(level[1:] - e) != np.sign(level[:-1] - e)):
            breaks.append(optimize.brentq(lambda t, e=e: log10(t) - e, x[i], x[i + 1], xtol=1e-13))
    breaks = np.sort(breaks)
    mass, total = np.zeros(len(edges) + 1), np.zeros(len(edges) + 1)
    p = lambda t: np.exp(log_density(np.atleast_1d(t))[0])  # noqa: E731
    for a, b in itertools.pairwise(breaks):
        k = np.searchsorted(edges, log10(0.5 * (a + b)), side="left")
        mass[k] += integrate.quad(p, a, b, epsabs=1e-14, limit=200)[0]
        f = lambda t: p(t) * pointwise(log_post(np.atleast_1d(t)))[0]  # noqa: E731
        total[k] += integrate.quad(f, a, b, epsabs=1e-14, limit=200)[0]
    return mass, total
