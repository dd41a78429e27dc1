"""Building and loading calibjax's CPU kernel (its operations in a program: ``calibjax.core.kernel``).

Two entry points into ``csrc/dense.cc`` (single-threaded: one XLA CPU device per core), built in two
variants: "avx2" (AVX2 and FMA) and, where the CPU has AVX-512, "avx512" (wider tiles, the same
bits: every element is computed by the same chain; tested). ``variant()`` picks one from
``runtime.cpu_isa``, so XLA's ``--xla_cpu_max_isa=AVX2`` selects the avx2 variant too.

- ``loss_and_grads(params, x, c, weight)``: a whole training step of a ReLU MLP with
  cross-entropy (the forward pass, the loss and every gradient) in one call; the engine uses it
  for such models (``fuses``), and Adam and the data draw stay in XLA.
- ``dense(x, w)``: ``x @ w`` for any other dense layer (other activations and losses, the
  evaluation's forward passes): the forward product, the input gradient and the weight gradient
  (a ``custom_vjp``) by batched small-matrix products, so no product of the model is left to
  XLA's dot (whose summation order depends on the CPU model).

Under ``vmap`` every run is one batch entry of the same call. Each product's element is one fused
multiply-add chain over k in order, whatever the batch or tile, so a run's numbers do not depend
on its batch mates, the batch size or the device.

The kernel is compiled from source on first use, with the system's C++ compiler against the XLA FFI
headers that jaxlib ships, into a cache keyed by the source, the flags, jaxlib and the compiler
(``$CALIBJAX_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/calibjax/kernels``, else
``~/.cache/calibjax/kernels``); ``make install`` (``python -m calibjax.execution.kernel_loader``) builds it
once. Where it cannot be built or run (no compiler, a CPU without AVX2/FMA, a GPU), ``resolve``
falls back to XLA's dot and says why once.

Which path a run uses is its ``train.Static.dense``, "kernel" or "xla", which the engine sets from
its layout (``planning.dense_choice``: ``--dense``, ``$CALIBJAX_DENSE``, what the results directory
recorded, else "auto"). The two give different bits, so a results directory records its path and
refuses runs of the other.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

from calibjax.core import kernel
from calibjax.errors import CalibjaxError
from calibjax.execution import runtime

SOURCE = Path(__file__).with_name("csrc") / "dense.cc"
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-shared", "-std=c++17")
VARIANTS = {"avx2": FLAGS, "avx512": (*FLAGS, "-mavx512f")}
CHOICES = ("auto", "kernel", "xla")

_lock = threading.Lock()
_state: dict = {}


class KernelError(CalibjaxError):
    """The kernel cannot be built or used here (an error where it was asked for explicitly)."""


def cache_dir() -> Path:
    if os.environ.get("CALIBJAX_KERNEL_CACHE"):
        return Path(os.environ["CALIBJAX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "calibjax" / "kernels"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def variant() -> str:
    """The build this process uses: "avx512" where the CPU has AVX-512 (and no --xla_cpu_max_isa below
    it), else "avx2"."""
    return "avx512" if runtime.cpu_isa() == "avx512" else "avx2"


def library_path(cxx: str, variant: str = "avx2") -> Path:
    """Where the build for this source, variant (its flags), jaxlib and compiler lives."""
    import jaxlib

    key = hashlib.sha256(
        b"\0".join(
            [
                SOURCE.read_bytes(),
                " ".join(VARIANTS[variant]).encode(),
                jaxlib.__version__.encode(),
                _compiler_version(cxx).encode(),
            ]
        )
    ).hexdigest()[:16]
    return cache_dir() / f"calibjax_dense-{variant}-{key}.so"


def _sha256(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(lib: Path) -> str | None:
    """Why a cached build is not the file its build wrote (None: it is): its SHA-256 must be the
    one recorded beside it (``<lib>.sha256``). A damaged library (truncated, overwritten) would
    crash the process that loads it (SIGBUS) instead of failing with a message."""
    try:
        recorded = Path(f"{lib}.sha256").read_text().strip()
    except OSError:
        return "no SHA-256 recorded beside it (built before calibjax 0.11.0, or its record lost)"
    try:
        return None if recorded == _sha256(lib) else "its SHA-256 differs from the one recorded at build"
    except OSError as e:
        return f"unreadable ({e.strerror})"


def build(verbose: bool = False, variant: str = "avx2") -> Path:
    """Compile a variant of the kernel into the cache (if not there yet, or damaged: ``intact``)
    and return the library's path.

    The library is written under a temporary name and renamed (its SHA-256 recorded first), so
    processes building at the same time (tasks of an array job sharing a home directory) never
    load a half-written file.
    """
    cxx = compiler()
    if cxx is None:
        raise KernelError("no C++ compiler found (g++, c++ or clang++ on PATH, or $CXX)")
    lib = library_path(cxx, variant)
    if lib.exists():
        why = damage(lib)
        if why is None:
            return lib
        print(f"calibjax: the cached CPU kernel {lib} cannot be trusted ({why}); rebuilding it", file=sys.stderr)
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [cxx, *VARIANTS[variant], f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    t0 = time.perf_counter()
    try:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelError(f"compiling {SOURCE.name} failed ({cxx}): {e}") from None
        if out.returncode != 0:
            raise KernelError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}): {out.stderr.strip()[-2000:]}")
        digest = f"{lib}.sha256"
        Path(f"{tmp}.sha256").write_text(_sha256(Path(tmp)) + "\n")
        os.replace(f"{tmp}.sha256", digest)
        os.replace(tmp, lib)
    finally:
        for leftover in (tmp, f"{tmp}.sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    if verbose:
        print(f"calibjax: built the CPU kernel ({variant}) in {time.perf_counter() - t0:.1f} s: {lib}", file=sys.stderr)
    return lib


def _open(variant: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(verbose=True, variant=variant)))
    if not lib.calibjax_cpu_supported():
        raise KernelError(f"this CPU lacks {'AVX-512' if variant == 'avx512' else 'AVX2 or FMA'}")
    return lib


def _load() -> str | None:
    """Build, load and register the kernel once per process (this CPU's variant; the avx2 one if that
    fails); None if it works, else why not."""
    with _lock:
        if "error" not in _state:
            try:
                isa = runtime.cpu_isa()
                if isa not in ("avx2", "avx512"):
                    raise KernelError(
                        f"it needs AVX2 and FMA, and this CPU computes with {isa}"
                        + (" (--xla_cpu_max_isa)" if runtime.xla_max_isa() else "")
                    )
                try:
                    chosen = variant()
                    lib = _open(chosen)
                except KernelError as e:
                    if chosen == "avx2":
                        raise
                    print(
                        f"calibjax: the CPU kernel's avx512 variant is unavailable ({e}); using its avx2 variant "
                        "(the same numbers, slower)",
                        file=sys.stderr,
                    )
                    chosen, lib = "avx2", _open("avx2")
                targets = ((kernel.TARGET, lib.CalibjaxBatchedMatmul), (kernel.STEP_TARGET, lib.CalibjaxMlpStep))
                for target, fn in targets:
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
                    kernel.registered(target)
                _state.update(error=None, lib=lib, variant=chosen)
            except (KernelError, OSError, AttributeError) as e:
                _state["error"] = str(e)
        return _state["error"]


def loaded_variant() -> str | None:
    """The variant this process registered with XLA ("avx2" or "avx512"), None if none."""
    return _state.get("variant") if available() else None


def available() -> bool:
    return _load() is None


def require() -> None:
    """Raise why the kernel cannot run here (it is registered with XLA once this returns)."""
    error = _load()
    if error is not None:
        raise KernelError(f"the calibjax CPU kernel is unavailable: {error}")


def resolve(choice: str, backend: str) -> str:
    """The path a run takes: "kernel" or "xla", from "auto", "kernel" or "xla" on this backend.

    "auto" takes the kernel on CPU when it builds and runs here, else XLA (saying why once, on
    stderr, when the kernel fails on a CPU); an explicit "kernel" that cannot run is an error.
    """
    if choice not in CHOICES:
        raise KernelError(f"--dense / $CALIBJAX_DENSE: expected one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "xla":
        return "xla"
    if backend != "cpu":
        if choice == "kernel":
            raise KernelError(f"the calibjax kernel runs on CPU only, and this backend is {backend}")
        return "xla"
    if choice == "kernel":
        require()
        return "kernel"
    error = _load()
    if error is not None:
        _warn_once(error)
        return "xla"
    return "kernel"


@functools.cache
def _warn_once(error: str) -> None:
    print(f"calibjax: the CPU kernel is unavailable ({error}); the dense layers use XLA's dot", file=sys.stderr)


def main() -> int:
    """``python -m calibjax.execution.kernel_loader``: build the kernel now (``make install`` does), say where."""
    try:
        lib = build(verbose=True, variant=variant())
    except KernelError as e:
        print(f"calibjax: the CPU kernel cannot be built here ({e}); calibjax will use XLA's dot", file=sys.stderr)
        return 0
    print(f"calibjax: CPU kernel ready: {lib}" + ("" if available() else f" (not usable here: {_state['error']})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
