"""calibjax: how well, how fast and where classifiers learn the exact Bayesian posterior P(C|x).

Importing calibjax changes no environment variable, JAX setting or matplotlib backend. Call
``calibjax.setup()`` before any JAX computation to expose one XLA CPU device per core (runs are
sharded over them) and keep compiled programs on disk; the command line does this itself.
"""

__version__ = "0.9.0"


def setup(cpu_devices: int | None = None, cache_dir=None):
    """See ``calibjax.runtime.setup`` (imported on first use, so ``import calibjax`` stays light)."""
    from calibjax.runtime import setup as _setup

    return _setup(cpu_devices, cache_dir)
