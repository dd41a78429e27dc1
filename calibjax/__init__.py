"""calibjax: how well, how fast and where classifiers learn the exact Bayesian posterior P(C|x).

Importing calibjax changes no environment variable, JAX setting or matplotlib backend, and loads
nothing heavy: the names below are imported on first use. Call ``calibjax.setup()`` before any
JAX computation to expose one XLA CPU device per core (runs are sharded over them) and keep
compiled programs on disk; the command line does this itself.

    calibjax.setup()
    report = calibjax.run("sweeps/blog.toml")     # train or resume, tables, summaries, figures, report
    t = calibjax.load_results(report.out)          # dict of DataFrames: runs, metrics, density, ...

The package, by layer (each imports only those above it; tests/test_architecture.py checks it):

- ``calibjax.core``: the traceable program and its truth (no I/O)
- ``calibjax.sweep``: sweep files: schema, validation, parsing, resolution, expansion, run identity
- ``calibjax.storage``: results directories: file mechanics, table schemas, reading tables back
- ``calibjax.execution``: runtime, the CPU kernel's build, planning, the engine
- ``calibjax.analysis``: summaries, figures, the HTML report
- ``calibjax.cluster``: SLURM; ``calibjax.pipeline``: run, merge and plan; ``calibjax.cli``
"""

from calibjax.errors import CalibjaxError

__version__ = "0.14.0"

# Public names, imported on first use: name -> (module, its name there).
_LAZY = {
    "setup": ("calibjax.execution.runtime", "setup"),
    "run": ("calibjax.pipeline", "run"),
    "plan": ("calibjax.pipeline", "plan"),
    "merge": ("calibjax.pipeline", "merge"),
    "finish": ("calibjax.pipeline", "finish"),
    "load_sweep": ("calibjax.sweep", "load"),
    "load_results": ("calibjax.storage.reader", "load_results"),
    "read_table": ("calibjax.storage.reader", "read_table"),
    "Results": ("calibjax.storage.reader", "Results"),
    "load": ("calibjax.storage.reader", "load"),
    "export": ("calibjax.storage.arrays", "export"),
    "summarize": ("calibjax.analysis.summaries", "summarize"),
    "standard_figures": ("calibjax.analysis.figures", "standard_figures"),
}
__all__ = ["CalibjaxError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'calibjax' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
