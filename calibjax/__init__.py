"""calibjax: how well, how fast and where classifiers learn the exact Bayesian posterior P(C|x).

Importing calibjax before jax exposes one XLA CPU device per core (runs are sharded over them,
about twice the throughput of a single CPU device on a 2-core machine); set CALIBJAX_CPU_DEVICES
to choose the number, or put --xla_force_host_platform_device_count in XLA_FLAGS yourself.
"""

import os
import sys

__version__ = "0.2.0"


def configure_cpu_devices() -> None:
    """One XLA CPU device per core, if jax is not imported yet and nobody chose otherwise.

    Harmless on GPU machines, where the CPU is not the default backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or "jax" in sys.modules:
        return
    n = os.environ.get("CALIBJAX_CPU_DEVICES") or str(len(os.sched_getaffinity(0)))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()


configure_cpu_devices()
