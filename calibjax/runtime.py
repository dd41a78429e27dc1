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


def _positive_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise SetupError(f"{name}: expected a positive integer, got {text!r}") from None
    if value < 1:
        raise SetupError(f"{name}: expected a positive integer, got {value}")
    return value


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity, and inside a SLURM allocation no more than the
    task's SLURM_CPUS_PER_TASK (clusters without CPU binding leave the affinity at the whole node)."""
    cores = len(os.sched_getaffinity(0))
    slurm = _positive_int("SLURM_CPUS_PER_TASK") if "SLURM_JOB_ID" in os.environ else None
    return min(cores, slurm) if slurm else cores


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def memory_limit() -> tuple[int, str]:
    """Bytes of host memory this process may use, and where that number comes from: the RAM, a SLURM
    allocation's memory (SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU times the task's CPUs, in MB) or
    the cgroup's limit, whichever is smallest."""
    limits = [(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host RAM")]
    if "SLURM_JOB_ID" in os.environ:
        per_node, per_cpu = _positive_int("SLURM_MEM_PER_NODE"), _positive_int("SLURM_MEM_PER_CPU")
        if per_node:
            limits.append((per_node << 20, "SLURM_MEM_PER_NODE"))
        elif per_cpu:
            cpus = _positive_int("SLURM_CPUS_PER_TASK") or _positive_int("SLURM_CPUS_ON_NODE") or 1
            limits.append(((per_cpu * cpus) << 20, "SLURM_MEM_PER_CPU"))
    cgroup = _cgroup_memory_limit()
    if cgroup:
        limits.append((cgroup, "cgroup memory limit"))
    return min(limits, key=lambda item: item[0])


def cpu_device_request(cpu_devices: int | None = None) -> int:
    """The CPU device count to ask for: the argument, else $CALIBJAX_CPU_DEVICES, else one per usable
    core (``usable_cpus``)."""
    if cpu_devices is None:
        cpu_devices = _positive_int("CALIBJAX_CPU_DEVICES") or usable_cpus()
    if cpu_devices < 1:
        raise SetupError(f"CALIBJAX_CPU_DEVICES / cpu_devices: expected a positive integer, got {cpu_devices}")
    return cpu_devices


def setup(cpu_devices: int | None = None, cache_dir: str | Path | None = None) -> Runtime:
    """Configure JAX for calibjax: call before any JAX computation.

    cpu_devices: XLA CPU devices to expose (default $CALIBJAX_CPU_DEVICES, else one per core this
    process may use: its affinity, capped by SLURM_CPUS_PER_TASK inside a SLURM job).
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
