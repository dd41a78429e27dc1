"""True calibration (calibjax.core.metrics) against the independent float64 references (tests/truth_reference.py).

    python benchmarks/true_calibration_accuracy.py [POINTS]

For the study's three tasks, a wide-and-narrow task and a three-class task, and models
q = softmax(a log P + b) (tilted, temperature-scaled, constant), prints calibjax's true_ece,
cal_term and grouping_term on a grid of POINTS (default 2048, the default eval.points) beside the
reference's, with the relative error. Two-class references: closed-form level sets; three classes:
the piecewise-Newton reference.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy import special  # noqa: E402

from calibjax.core import metrics, tasks  # noqa: E402

import truth_reference  # noqa: E402

TASKS = {  # (priors, means, sigmas)
    "example 1": ((0.5, 0.5), (0.0, 3.0), (1.0, 1.0)),
    "example 2": ((0.5, 0.5), (0.0, 1.0), (2.0, 1.0)),
    "example 3": ((0.5, 0.5), (0.0, 3.0), (2.0, 1.0)),
    "sigma 4 vs 1": ((0.5, 0.5), (0.0, 2.0), (4.0, 1.0)),
    "three classes": ((0.3, 0.3, 0.4), (-2.0, 0.0, 2.5), (1.0, 0.7, 1.5)),
}
MODELS = {"tilted": (1.0, 0.8), "T=2": (0.5, 0.0), "T=0.5": (2.0, 0.0), "constant": (0.0, 0.4)}


def reference(task, a: float, b: float) -> dict[str, float]:
    prior, mu, sigma = task
    if len(prior) == 2:
        return truth_reference.true_calibration(prior, mu, sigma, a, b)
    log_density, log_post = truth_reference.gaussian_task(*task)
    shift = np.zeros(len(prior))
    shift[0] = b
    lo = min(m - 12 * s for m, s in zip(mu, sigma, strict=True))
    hi = max(m + 12 * s for m, s in zip(mu, sigma, strict=True))
    return truth_reference.top_label_calibration(
        log_density, log_post, lambda x: special.log_softmax(a * log_post(x) + shift, axis=-1), lo, hi
    )


def main(points: int = 2048) -> None:
    spec = metrics.EvalSpec(points=points)
    keys = ("true_ece", "cal_term", "grouping_term")
    print("task | q | " + " | ".join(f"{k}: calibjax / reference (error)" for k in keys))
    for name, task in TASKS.items():
        prior, mu, sigma = (np.asarray(v) for v in task)
        ev = metrics.make_eval_set(tasks.make_task(prior, mu[:, None, None], sigma[:, None, None]), spec)
        for model, (a, b) in MODELS.items():
            if a == 0 and len(prior) > 2:
                continue  # (a constant q has no level sets to follow; the two-class rows test it)
            shift = jnp.zeros(len(prior)).at[0].set(b)
            got = metrics.true_calibration(ev, jax.nn.log_softmax(a * ev.log_post + shift[None, :]), spec)
            want = reference(task, a, b)
            cells = [f"{float(got[k]):.4g} / {want[k]:.4g} ({float(got[k]) / want[k] - 1:+.2%})" for k in keys]
            print(f"{name} | {model} | " + " | ".join(cells))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2048)
