"""True calibration (calibjax.core.metrics) against the independent float64 reference (tests/truth_reference.py).

    python benchmarks/true_calibration_accuracy.py [LEVELS]

For the study's three tasks and q1 = sigmoid(a logit P + b) (tilted, temperature-scaled, constant
and exact), prints calibjax's true_ece, cal_term and grouping_term beside the reference's.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from calibjax.core import metrics, tasks  # noqa: E402

import truth_reference  # noqa: E402

STUDY = {1: (0, 1, 3, 1), 2: (0, 2, 1, 1), 3: (0, 2, 3, 1)}
MODELS = {
    "tilted b=0.8": (1.0, 0.8),
    "T=2": (0.5, 0.0),
    "T=0.5": (2.0, 0.0),
    "constant": (0.0, 0.4),
    "exact": (1.0, 0.0),
}


def main(levels: int = 256) -> None:
    spec = metrics.EvalSpec(true_levels=levels)
    print("task | q | " + " | ".join(f"{k} calibjax / reference" for k in ("true_ece", "cal_term", "grouping_term")))
    for n, (m1, s1, m2, s2) in STUDY.items():
        ev = metrics.make_eval_set(tasks.make_task([0.5, 0.5], [[[m1]], [[m2]]], [[[s1]], [[s2]]]), spec)
        z = ev.log_post[:, 0] - ev.log_post[:, 1]
        for name, (a, b) in MODELS.items():
            q1 = jax.nn.sigmoid(a * z + b)
            got = metrics.true_calibration(ev, jnp.log(jnp.stack([q1, 1 - q1], -1)), spec)
            want = truth_reference.true_calibration((0.5, 0.5), (m1, m2), (s1, s2), a, b)
            print(f"example {n} | {name} | " + " | ".join(f"{float(got[k]):.4g} / {want[k]:.4g}" for k in want))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
