"""Execution: the process's runtime (devices, XLA flags, the CPU), the CPU kernel's build, the plan
(layouts, chunks, memory) and the engine that trains a sweep's chunks and writes them.

``runtime.setup()`` must run before any JAX computation (``calibjax.setup`` is the same).
"""

from calibjax.execution import engine, kernel_loader, planning, runtime
from calibjax.execution.engine import Report, run_sweep
from calibjax.execution.planning import Layout, default_layout, plan
from calibjax.execution.runtime import SetupError, setup

__all__ = [
    "Layout",
    "Report",
    "SetupError",
    "default_layout",
    "engine",
    "kernel_loader",
    "plan",
    "planning",
    "run_sweep",
    "runtime",
    "setup",
]
