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

import numpy as np
from scipy import special


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
    w = density / np.trapezoid(density, x)
    return {
        "true_ece": np.trapezoid(w * np.abs(m - conf), x),
        "cal_term": np.trapezoid(w * (conf - m) ** 2, x),
        "grouping_term": np.trapezoid(w * (m - p_top) ** 2, x),
    }


def _roots(A, B, C):
    """Real roots of A x^2 + B x + C = 0 (C an array); nan where there is none."""
    if A == 0:
        return [-C / B]
    disc = B**2 - 4 * A * C
    sq = np.sqrt(np.where(disc >= 0, disc, np.nan))
    return [(-B + sq) / (2 * A), (-B - sq) / (2 * A)]
