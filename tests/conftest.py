"""Shared set-up and builders: 4 simulated CPU devices, a private compilation cache, sweep text and
command-line calls."""

import atexit
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole test session (subprocesses inherit it), never the user's.
if "CALIBJAX_CACHE_DIR" not in os.environ:
    os.environ["CALIBJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="calibjax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["CALIBJAX_CACHE_DIR"], ignore_errors=True)
if "CALIBJAX_KERNEL_CACHE" not in os.environ:  # the CPU kernel's build likewise (cpu_kernel)
    os.environ["CALIBJAX_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="calibjax-test-kernel-")
    atexit.register(shutil.rmtree, os.environ["CALIBJAX_KERNEL_CACHE"], ignore_errors=True)

import calibjax  # noqa: E402

# Tests run on the CPU with 4 simulated devices, so multi-device code paths are exercised.
calibjax.setup(cpu_devices=4)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from isa import lowered_isa_env  # noqa: E402, F401 (for the tests)

from calibjax.core import metrics, tasks, train  # noqa: E402

# Tests that start real outside systems run only when asked (their make targets install the packages).
SYSTEMS = {
    "cluster": "starts a real SLURM cluster: make test-cluster",
    "browser": "renders a page in Debian's chromium: make test-browser",
    "qemu": "trains on an emulated AVX2 CPU (Debian's qemu-user): make test-isa",
}


def pytest_addoption(parser):
    for name, what in SYSTEMS.items():
        parser.addoption(f"--{name}", action="store_true", help=f"run the tests marked {name} ({what})")


def pytest_collection_modifyitems(config, items):
    for name, what in SYSTEMS.items():
        if not config.getoption(f"--{name}"):
            skip = pytest.mark.skip(reason=what)
            for item in items:
                if name in item.keywords:
                    item.add_marker(skip)


def example(n: int) -> tasks.GaussianTask:
    """The study's examples 1-3: (mu1, sigma1, mu2, sigma2)."""
    mu1, s1, mu2, s2 = {1: (0, 1, 3, 1), 2: (0, 2, 1, 1), 3: (0, 2, 3, 1)}[n]
    return tasks.make_task([0.5, 0.5], [[[mu1]], [[mu2]]], [[[s1]], [[s2]]])


# A small static setting shared by the training tests, so they share one compile.
SMALL = train.Static(
    steps=60, checkpoints=(0, 20, 60), hidden=(16, 16), batch_size=32, eval=metrics.EvalSpec(points=256), curve_points=9
)


@pytest.fixture
def small_static():
    return SMALL


# ---------------------------------------------------------------- sweep text

# A tiny sweep every test starts from: two classes, one hidden layer of 8, 30 steps.
TINY = {
    "name": "tiny",
    "seeds": 2,
    "task": {"means": [0.0, 3.0], "sigmas": [1.0, 1.0]},
    "model": {"hidden": [8]},
    "train": {"steps": 30, "checkpoints": [10, 30], "n_data": 500},
    "eval": {"points": 128},
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)  # inf and nan are TOML too
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(doc: dict) -> str:
    """A sweep document as TOML: top-level keys, then [section] tables and [cases.NAME] tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, table in doc.items():
        if not isinstance(table, dict):
            continue
        named = table.items() if section == "cases" else [(None, table)]
        for name, body in named:
            lines.append(f"[{section}.{name}]" if name else f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def sweep_doc(**changes) -> dict:
    """TINY with changes: a section given as a dict updates that section (a None value removes a
    key); any other value replaces the top-level key (None removes it)."""
    doc = copy.deepcopy(TINY)
    for key, value in changes.items():
        if isinstance(value, dict) and key in doc and key not in ("cases", "grid"):
            for k, v in value.items():
                doc[key].pop(k, None) if v is None else doc[key].__setitem__(k, v)
        elif value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def sweep_text(**changes) -> str:
    """TOML text of ``sweep_doc(**changes)``."""
    return to_toml(sweep_doc(**changes))


# ---------------------------------------------------------------- command line


def cli(*args, cwd=None, env=None, timeout=600, cpu=None) -> subprocess.CompletedProcess:
    """``python -m calibjax ARGS`` in a fresh process on 2 CPU devices (env adds or, with None, removes
    variables); with cpu (a QEMU CPU model, e.g. "Haswell-noTSX"), on that CPU emulated by qemu-x86_64."""
    full = {**os.environ, "CALIBJAX_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    for k, v in (env or {}).items():
        full.pop(k, None) if v is None else full.__setitem__(k, v)
    emulator = ["qemu-x86_64", "-cpu", cpu] if cpu else []
    return subprocess.run(
        [*emulator, sys.executable, "-m", "calibjax", *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd,
        timeout=timeout,
    )


# ---------------------------------------------------------------- processes


def python_in(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh process (env adds or, with None, removes variables)."""
    full = dict(os.environ)
    for k, v in (env or {}).items():
        full.pop(k, None) if v is None else full.__setitem__(k, v)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
