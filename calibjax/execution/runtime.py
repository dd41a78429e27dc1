"""Explicit set-up of the JAX runtime (CPU device count, compilation cache, XLA without YNNPACK),
and what the manifest says about the CPU (its vector instruction set, and the class of CPUs whose
runs give the same bits).

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

from calibjax.errors import CalibjaxError


class SetupError(CalibjaxError):
    """A bad device-count setting (the message names it)."""


@dataclass(frozen=True)
class Runtime:
    """What setup() arranged."""

    cpu_devices: int  # CPU devices JAX exposes (what the CPU layout shards runs over)
    cache_dir: str | None  # persistent compilation cache, or None


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
    most = DEVICES_PER_CORE * usable_cpus()
    if cpu_devices > most:
        raise SetupError(
            f"CALIBJAX_CPU_DEVICES / cpu_devices: {cpu_devices} CPU devices on {usable_cpus()} usable core(s); at "
            f"most {most} ({DEVICES_PER_CORE} per core: more only add threads and memory, never speed)"
        )
    return cpu_devices


# Simulated CPU devices per usable core: tests run multi-device code on 4 devices on 2 cores.
DEVICES_PER_CORE = 8


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

    XLA's CPU backend computes with its own code only (``PORTABLE_XLA_FLAG`` added to XLA_FLAGS,
    unless XLA_FLAGS sets that flag itself): YNNPACK, to which it would hand reductions, picks its
    kernels by the CPU it finds, and their sums differ between AVX2 and AVX-512 CPUs.

    If JAX's backends already exist (some JAX computation ran first), the device count and XLA's
    flags cannot change any more: setup warns, naming the count the process has, and goes on with
    it (its runs then belong to this CPU model only: ``cpu_class``).
    """
    devices = cpu_device_request(cpu_devices)
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # backends exist already (JAX accepts an unchanged value silently)
        have = len(jax.devices("cpu"))
        warnings.warn(
            f"calibjax.setup: JAX was already initialised with {have} CPU device(s), so calibjax "
            f"uses {have}, not {devices}; call calibjax.setup() before any JAX computation",
            RuntimeWarning,
            stacklevel=2,
        )
        devices = have
    else:
        if _xla_flag(PORTABLE_XLA_FLAG) is None:
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {PORTABLE_XLA_FLAG}".strip()
        _xla_flags_applied.append(True)
    return Runtime(devices, _compilation_cache(cache_dir))


# XLA's CPU backend without YNNPACK (see setup); tested: under QEMU emulating a Haswell, a vmapped
# (256 x 4094) product-sum gave other bits than on an AVX-512 Xeon with YNNPACK, the same without.
PORTABLE_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_xla_flags_applied: list = []  # set by setup() before JAX's backends started


def portable_xla() -> bool:
    """Whether this process's XLA computes with its own code alone (no YNNPACK): XLA_FLAGS holds
    PORTABLE_XLA_FLAG, put there by setup() or by the user before JAX started."""
    return _xla_flag(PORTABLE_XLA_FLAG) == "" and (bool(_xla_flags_applied) or not _backends_started())


def _xla_flag(prefix: str) -> str | None:
    """The value of the last "--name=value" in $XLA_FLAGS that starts with prefix ("--name="), or None."""
    values = [f[len(prefix) :] for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(prefix)]
    return values[-1] if values else None


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


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


# Vector instruction sets, narrowest first, as calibjax names them; XLA's --xla_cpu_max_isa values map onto them.
ISAS = ("sse4.2", "avx", "avx2", "avx512")
_XLA_ISAS = {
    "SSE4_2": "sse4.2",
    "AVX": "avx",
    "AVX2": "avx2",
    "AVX512": "avx512",
    "AVX512_VNNI": "avx512",
    "AVX512_BF16": "avx512",
    "AMX": "avx512",
    "AMX_FP16": "avx512",
}


def xla_max_isa() -> str | None:
    """The cap set by --xla_cpu_max_isa in $XLA_FLAGS (calibjax's name for it), or None."""
    value = _xla_flag("--xla_cpu_max_isa=")
    return _XLA_ISAS.get(value.upper()) if value else None


def cpu_isa() -> str:
    """The widest vector instruction set this process computes with on this CPU: on x86-64
    "avx512" (F, BW, DQ, VL, CD: Intel Xeon since Skylake-SP, AMD since Zen 4), "avx2" (with FMA),
    "avx" or "sse4.2", capped by --xla_cpu_max_isa in $XLA_FLAGS (which the CPU kernel follows too);
    elsewhere the machine's name (e.g. "aarch64", "arm64")."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return machine or "unknown"
    from numpy._core._multiarray_umath import __cpu_features__ as has  # numpy's CPUID reading

    if all(has.get(f) for f in ("AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512CD", "FMA3")):
        isa = "avx512"
    elif has.get("AVX2") and has.get("FMA3"):
        isa = "avx2"
    else:
        isa = "avx" if has.get("AVX") else "sse4.2"
    cap = xla_max_isa()
    return min(isa, cap, key=ISAS.index) if cap else isa


def cpu_model() -> str:
    """The CPU's model name ("" where the system does not say)."""
    return _cpuinfo().get("model name", platform.processor())


def cpu_signature() -> str:
    """This CPU's vendor, family and model numbers and vector instruction set, e.g.
    "GenuineIntel-6-143-avx512" (the machine's name in place of the numbers where /proc/cpuinfo
    does not give them)."""
    info = _cpuinfo()
    if {"vendor_id", "cpu family", "model"} <= info.keys():
        return f"{info['vendor_id']}-{info['cpu family']}-{info['model']}-{cpu_isa()}"
    return f"{platform.machine().lower() or 'unknown'}-{cpu_isa()}"


def _cpuinfo() -> dict:
    """The first processor's entries in /proc/cpuinfo ({} where there is none)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_class(dense: str) -> str:
    """The CPUs on which a run computed with this product path ("kernel" or "xla") gives the same
    bits. With calibjax's kernel, every x86-64 CPU with AVX2 and FMA, AVX-512 ones included:
    "x86-64-fma" (tested: tests/test_portability.py, under QEMU emulating a Haswell); elsewhere the
    instruction set (ARM, or x86 without FMA: XLA rounds its arithmetic otherwise). With XLA's dot,
    only CPUs of this model and instruction set (``cpu_signature``): XLA orders a dot's sums by the
    CPU model it compiles for; and with YNNPACK on (``setup`` turns it off), any path's runs too.
    """
    if dense == "xla" or not portable_xla():
        return cpu_signature()
    isa = cpu_isa()
    return "x86-64-fma" if isa in ("avx2", "avx512") else isa


def environment() -> dict:
    """Versions, platform, CPU, backend and devices, for the manifest."""
    versions = {}
    for pkg in ("calibjax", "jax", "jaxlib", "flax", "optax", "numpy", "pandas", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "cpu": {"model": cpu_model(), "signature": cpu_signature(), "isa": cpu_isa(), "cores": usable_cpus()},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.local_devices()],
    }
