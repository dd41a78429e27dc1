"""Logarithm and exponential whose bits do not depend on the CPU (float64, elementwise, numpy).

numpy picks its code for ``np.log``, ``np.exp``, ``np.log10`` and ``np.power`` (so also
``np.geomspace``) at run time from the CPU's vector extensions: on AVX-512 machines (Intel Xeon
since Skylake-SP, AMD since Zen 4) its float64 results differ in the last bit from those of AVX2
machines (where numpy calls the C library) for some inputs, and its float32 results differ again on
CPUs without AVX2 and on ARM. Every transcendental calibjax computes on the host and keeps (task
log-priors and log-weights, logspace grid values, the summaries' log-log interpolation) goes through
this module instead, so those numbers are the same on every machine.

The algorithms are fdlibm's ``__ieee754_log`` and ``__ieee754_exp`` (Sun Microsystems, 1993, the
reference that Java's StrictMath specifies), evaluated with numpy's +, -, *, /, rint and exact
scaling by powers of two only: operations IEEE 754 rounds the same way on every CPU, vectorised or
not, and numpy never fuses into fma. Error under 1 ulp (tests/test_portable.py checks against
correctly rounded values, and the bits under numpy's AVX-512, AVX2 and baseline dispatch).
"""

from __future__ import annotations

import numpy as np

_LN2_HI = 6.93147180369123816490e-01  # ln 2 to 32 bits: k * _LN2_HI is exact for |k| < 2^20
_LN2_LO = 1.90821492927058770002e-10  # ln 2 - _LN2_HI
_INV_LN2 = 1.44269504088896338700e00
_EXP_P = (
    1.66666666666666019037e-01,
    -2.77777777770155933842e-03,
    6.61375632143793436117e-05,
    -1.65339022054652515390e-06,
    4.13813679705723846039e-08,
)
_EXP_OVER = 7.09782712893383973096e02  # exp overflows above this
_EXP_UNDER = -7.45133219101941108420e02  # and is 0 below this
_LOG_LG = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)


def _poly(x: np.ndarray, coefficients) -> np.ndarray:
    """c0 + x (c1 + x (c2 + ...)) by Horner's rule."""
    out = np.full_like(x, coefficients[-1])
    for c in coefficients[-2::-1]:
        out = c + x * out
    return out


def exp(x) -> np.ndarray | float:
    """e**x, elementwise (float64); a Python float for a scalar."""
    x = np.asarray(x, np.float64)
    finite = np.clip(np.nan_to_num(x), _EXP_UNDER, _EXP_OVER)
    # x = k ln2 + r, |r| <= ln2 / 2, r carried as hi - lo.
    k = np.trunc(finite * _INV_LN2 + np.copysign(0.5, finite))
    hi = finite - k * _LN2_HI
    lo = k * _LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * _poly(t, _EXP_P)
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    out = np.ldexp(y, k.astype(np.int32))
    out = np.where(x > _EXP_OVER, np.inf, np.where(x < _EXP_UNDER, 0.0, out))
    out = np.where(np.isnan(x), np.nan, out)
    return float(out) if out.ndim == 0 else out


def log(x) -> np.ndarray | float:
    """Natural logarithm, elementwise (float64): -inf at 0, nan below; a Python float for a scalar."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x) & (x > 0)
    m, e = np.frexp(np.where(ok, x, 1.0))  # x = m 2^e, 0.5 <= m < 1 (subnormals too)
    top = np.floor((2.0 * m - 1.0) * 2.0**20)  # the 20 high bits of x's mantissa (fdlibm's hx)
    # 1 + f in [sqrt(2)/2, sqrt(2)): f exact (Sterbenz) either way.
    low = top >= 0x6A09C
    f = np.where(low, m - 1.0, 2.0 * m - 1.0)
    k = np.where(low, e, e - 1).astype(np.float64)
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    big_r = z * _poly(w, _LOG_LG[0::2]) + w * _poly(w, _LOG_LG[1::2])
    half_f2 = 0.5 * f * f
    near_edge = (top >= 0x6147A) & (top <= 0x6B851)  # fdlibm's choice of the more accurate form
    general = np.where(
        near_edge,
        k * _LN2_HI - ((half_f2 - (s * (half_f2 + big_r) + k * _LN2_LO)) - f),
        k * _LN2_HI - ((s * (f - big_r) - k * _LN2_LO) - f),
    )
    r_small = f * f * (0.5 - 0.33333333333333333 * f)
    small = k * _LN2_HI - ((r_small - k * _LN2_LO) - f)  # |f| < 2^-20
    out = np.where(np.abs(f) < 2.0**-20, small, general)
    out = np.where(ok, out, np.where(x == 0, -np.inf, np.where(x == np.inf, np.inf, np.nan)))
    return float(out) if out.ndim == 0 else out


def log_float32(x) -> np.ndarray:
    """log of float32 values, as float32: the float64 logarithm rounded once (correctly rounded but
    for logarithms within about 2e-9 float32 ulp of a rounding boundary, the float64 one's error)."""
    return log(np.asarray(x, np.float32)).astype(np.float32)


def geomspace(start: float, stop: float, num: int) -> list[float]:
    """num values from start to stop (both > 0, both kept exactly), equally spaced in log."""
    if num == 1:
        return [float(start)]
    a, b = log(start), log(stop)
    values = exp(a + np.arange(num) * ((b - a) / (num - 1))).tolist()
    values[0], values[-1] = float(start), float(stop)
    return values
