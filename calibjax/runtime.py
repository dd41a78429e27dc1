"""Explicit set-up of the JAX runtime: CPU device count and compilation cache.

Importing calibjax changes nothing global. ``setup()`` is called once, before any JAX
computation, by the command line, the benchmarks and the tests; Python users call it too (it is
``calibjax.setup``) to get the fast CPU layout and the compilation cache.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import jax


class SetupError(ValueError):
    """A bad device-count setting (the message names it)."""


@dataclass(frozen=True)
class Runtime:
    """What setup() arranged."""

    cpu_devices: int        # CPU devices JAX exposes (what the CPU layout shards runs over)
    cache_dir: str | None   # persistent compilation cache, or None


def cpu_device_request(cpu_devices: int | None = None) -> int:
    """The CPU device count to ask for: the argument, else $CALIBJAX_CPU_DEVICES, else one per core."""
    if cpu_devices is None:
        text = os.environ.get("CALIBJAX_CPU_DEVICES", "").strip()
        if text:
            try:
                cpu_devices = int(text)
            except ValueError:
                raise SetupError(f"CALIBJAX_CPU_DEVICES: expected a positive integer, got {text!r}") from None
        else:
            cpu_devices = len(os.sched_getaffinity(0))
    if cpu_devices < 1:
        raise SetupError(f"CALIBJAX_CPU_DEVICES / cpu_devices: expected a positive integer, got {cpu_devices}")
    return cpu_devices


def setup(cpu_devices: int | None = None, cache_dir: str | Path | None = None) -> Runtime:
    """Configure JAX for calibjax: call before any JAX computation.

    cpu_devices: XLA CPU devices to expose (default $CALIBJAX_CPU_DEVICES, else one per core).
    Runs are sharded over them; on a 2-core machine two devices train about twice as fast as one.
    It overrides ``--xla_force_host_platform_device_count`` in XLA_FLAGS. Harmless on GPU
    machines, where the CPU is not the default backend.

    cache_dir: JAX's persistent compilation cache (keyed by program and compiler flags, so it
    cannot serve a wrong program): default $CALIBJAX_CACHE_DIR, else $XDG_CACHE_HOME/calibjax/xla,
    else ~/.cache/calibjax/xla; "off" disables it; a directory the user already set through
    jax.config is kept.

    If JAX's backends already exist (some JAX computation ran first), the device count cannot
    change any more: setup warns, naming the count the process has, and goes on with it.
    """
    devices = cpu_device_request(cpu_devices)
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # backends exist already (JAX accepts an unchanged value silently)
        have = len(jax.devices("cpu"))
        warnings.warn(f"calibjax.setup: JAX was already initialised with {have} CPU device(s), so calibjax "
                      f"uses {have}, not {devices}; call calibjax.setup() before any JAX computation",
                      RuntimeWarning, stacklevel=2)
        devices = have
    return Runtime(devices, _compilation_cache(cache_dir))


def _compilation_cache(choice: str | Path | None) -> str | None:
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    choice = os.environ.get("CALIBJAX_CACHE_DIR") if choice is None else str(choice)
    if choice in ("off", "0", ""):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(choice) if choice else base / "calibjax" / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, as without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return str(path)


def environment() -> dict:
    """Versions, platform, backend and devices, for the manifest."""
    versions = {}
    for pkg in ("calibjax", "jax", "jaxlib", "flax", "optax", "numpy", "pandas", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.local_devices()]}
