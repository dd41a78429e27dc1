import os

# Tests run on the CPU with 4 simulated devices, so multi-device code paths are exercised.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()

# One compilation cache for the whole test session (subprocesses inherit it), never the user's.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "CALIBJAX_CACHE_DIR" not in os.environ:
    os.environ["CALIBJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="calibjax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["CALIBJAX_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from calibjax import metrics, tasks, train  # noqa: E402


def example(n: int) -> tasks.GaussianTask:
    """The study's examples 1-3: (mu1, sigma1, mu2, sigma2)."""
    mu1, s1, mu2, s2 = {1: (0, 1, 3, 1), 2: (0, 2, 1, 1), 3: (0, 2, 3, 1)}[n]
    return tasks.make_task([0.5, 0.5], [[[mu1]], [[mu2]]], [[[s1]], [[s2]]])


# A small static setting shared by the training tests, so they share one compile.
SMALL = train.Static(steps=60, checkpoints=(0, 20, 60), hidden=(16, 16), batch_size=32,
                     eval=metrics.EvalSpec(points=256), curve_points=9)


@pytest.fixture
def small_static():
    return SMALL
