"""Compute as on a CPU whose widest vector instruction set is AVX2 (or SSE4.2).

    python tests/isa.py avx2 -- COMMAND [ARGS...]    # run COMMAND so (make test-isa runs pytest)

Sets XLA's --xla_cpu_max_isa (which calibjax's CPU kernel follows too) and numpy's
NPY_DISABLE_CPU_FEATURES for every dispatch target above the level; on a CPU without those
extensions they change nothing. The tests use ``lowered_isa_env`` for their subprocesses.
"""

import os
import sys


def lowered_isa_env(isa: str = "avx2") -> dict:
    """The variables for a fresh process computing at ``isa`` ("avx2" or "sse4.2")."""
    from numpy._core import _multiarray_umath as npy

    def level(target: str) -> int:  # numpy's dispatch targets: X86_V3 (AVX2, FMA), X86_V4, AVX512_*
        return 2 if "512" in target or target == "X86_V4" else 1 if target in ("X86_V3", "AVX2", "FMA3") else 0

    keep = {"avx2": 1, "sse4.2": 0}[isa]
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_max_isa="))
    return {
        "XLA_FLAGS": f"{flags} --xla_cpu_max_isa={isa.upper().replace('.', '_')}".strip(),
        "NPY_DISABLE_CPU_FEATURES": ",".join(t for t in npy.__cpu_dispatch__ if level(t) > keep),
    }


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--" or sys.argv[1] not in ("avx2", "sse4.2"):
        sys.exit(__doc__)
    env = {**os.environ, **lowered_isa_env(sys.argv[1])}
    print(f"tests/isa.py: {' '.join(f'{k}={v!r}' for k, v in lowered_isa_env(sys.argv[1]).items())}", flush=True)
    os.execvpe(sys.argv[3], sys.argv[3:], env)
