"""calibjax.portable: logarithms and exponentials within 1 ulp of the correctly rounded values, with
the same bits whatever numpy's CPU dispatch; and no host module computing kept numbers with numpy's
or the C library's own transcendentals."""

import decimal
import math
import re
from pathlib import Path

import numpy as np
import pytest

from calibjax.core import portable

from conftest import lowered_isa_env, python_in

ROOT = Path(__file__).resolve().parents[1]
decimal.getcontext().prec = 50


def _ulps(got: np.ndarray, exact: list[decimal.Decimal]) -> np.ndarray:
    """|got - exact| in units of the last place of the float64 nearest the exact value."""
    out = []
    for g, e in zip(got, exact, strict=True):
        nearest = float(e)
        ulp = math.ulp(nearest) if nearest != 0 else 5e-324
        out.append(float(abs(decimal.Decimal(float(g)) - e) / decimal.Decimal(ulp)))
    return np.array(out)


def _inputs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positive numbers over the whole float64 range (subnormals, near 1, the edge near sqrt 2 where
    log switches formulas) and exponents from underflow to overflow."""
    positive = np.concatenate(
        [
            np.exp(rng.uniform(-744, 709, 1500)),
            rng.uniform(0.5, 2.0, 1000),
            1 + rng.uniform(-1e-6, 1e-6, 300),
            rng.uniform(1.38, 1.43, 300),
            [
                5e-324,
                2.2250738585072014e-308,
                0.5,
                1.0,
                2.0,
                np.nextafter(1.0, 0),
                np.nextafter(1.0, 2),
                math.sqrt(2),
                1e308,
                1.7976931348623157e308,
            ],
        ]
    )
    exponents = np.concatenate(
        [
            rng.uniform(-745, 709.7, 1500),
            rng.uniform(-1, 1, 1000),
            rng.uniform(-1e-9, 1e-9, 200),
            [0.0, 1.0, -1.0, 0.5 * math.log(2), 700.0, -700.0],
        ]
    )
    return positive, exponents


def test_log_and_exp_are_within_one_ulp_of_the_correctly_rounded_values():
    positive, exponents = _inputs(np.random.default_rng(0))
    log_err = _ulps(portable.log(positive), [decimal.Decimal(float(v)).ln() for v in positive])
    exp_err = _ulps(portable.exp(exponents), [decimal.Decimal(float(v)).exp() for v in exponents])
    assert log_err.max() < 1.0 and exp_err.max() < 1.0, (log_err.max(), exp_err.max())
    # and mostly correctly rounded: what would fail if a constant or a branch were wrong
    assert (log_err <= 0.5).mean() > 0.95 and (exp_err <= 0.5).mean() > 0.9


def test_special_values_and_scalars():
    assert math.isnan(portable.log(-1.0)) and math.isnan(portable.log(math.nan)) and math.isnan(portable.exp(math.nan))
    assert portable.log(0.0) == -math.inf and portable.log(math.inf) == math.inf and portable.log(1.0) == 0.0
    assert portable.exp(-math.inf) == 0.0 and portable.exp(math.inf) == math.inf and portable.exp(0.0) == 1.0
    assert portable.exp(710.0) == math.inf and portable.exp(-746.0) == 0.0
    assert isinstance(portable.log(2.0), float) and portable.log(np.array([[1.0]])).shape == (1, 1)
    x = np.float32([0.3, 0.7, 0.65, 0.99, 1.0, 0.0])
    expected = [np.float32(float(decimal.Decimal(float(v)).ln())) if v > 0 else -np.inf for v in x]
    assert portable.log_float32(x).dtype == np.float32 and list(portable.log_float32(x)) == expected


def test_geomspace_keeps_its_ends_and_spaces_evenly_in_log():
    values = portable.geomspace(0.25, 4.0, 12)
    assert values[0] == 0.25 and values[-1] == 4.0 and portable.geomspace(3.0, 5.0, 1) == [3.0]
    assert np.allclose(values, np.geomspace(0.25, 4.0, 12), rtol=4e-16, atol=0)
    ratios = np.diff(np.log(values))
    assert np.allclose(ratios, math.log(16) / 11, rtol=1e-13)


DIGEST = """
import hashlib, numpy as np
from calibjax.core import portable
rng = np.random.default_rng(1)
x = np.ldexp(rng.uniform(0.5, 1.0, 200_000), rng.integers(-1070, 1024, 200_000))  # (no np.exp: its bits vary)
y = rng.uniform(-740, 700, 200_000)
f = rng.uniform(0, 1, 200_000).astype(np.float32)
parts = [portable.log(x), portable.exp(y), portable.log_float32(f), np.array(portable.geomspace(1e-4, 0.3, 1000))]
print(hashlib.sha256(b"".join(p.tobytes() for p in parts)).hexdigest())
"""


@pytest.mark.parametrize("isa", ["avx2", "sse4.2"])
def test_bits_do_not_depend_on_numpys_cpu_dispatch(isa):
    native = python_in(DIGEST)
    lowered = python_in(DIGEST, env=lowered_isa_env(isa))
    assert native.returncode == lowered.returncode == 0, native.stderr + lowered.stderr
    assert native.stdout == lowered.stdout


# Host modules that keep numbers (everything but figures and the test tables' generator) take their
# transcendentals from calibjax.portable; jnp's inside compiled programs are XLA's (tested for bits
# across instruction sets in test_portability.py).
NOT_KEPT = {"plots.py", "synthetic.py", "portable.py"}
TRANSCENDENTAL = re.compile(
    r"(?<![\w.])(np|numpy|math)\.(log|log2|log10|log1p|exp|exp2|expm1|power|pow|geomspace|"
    r"logspace|sin|cos|tan|tanh|sinh|cosh|arctan|arctan2|erf|erfc|lgamma)\("
)


def test_host_modules_use_the_portable_transcendentals():
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in sorted((ROOT / "calibjax").rglob("*.py"))
        if p.name not in NOT_KEPT
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if TRANSCENDENTAL.search(line)
    ]
    assert not found, found
