"""Command line: parse arguments, call the library. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def configure_cpu_devices() -> None:
    """Expose one XLA CPU device per core (before jax is imported), so runs shard over cores.

    Respects an explicit --xla_force_host_platform_device_count in XLA_FLAGS and
    CALIBJAX_CPU_DEVICES. Harmless on GPU machines, where the CPU is not the default backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or "jax" in sys.modules:
        return
    n = os.environ.get("CALIBJAX_CPU_DEVICES") or str(len(os.sched_getaffinity(0)))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calibjax", description="Measure how well classifiers learn the exact "
                                "Bayesian posterior, over sweeps of thousands of runs.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every run of a sweep file and write tables and figures")
    run.add_argument("sweep", help="sweep file (TOML), e.g. sweeps/blog.toml")
    run.add_argument("--out", help="results directory (default results/<sweep name>)")
    run.add_argument("--overwrite", action="store_true", help="replace results of a different sweep file")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--chunk-size", type=int, help="most runs per compiled call (default 1024)")
    run.add_argument("--inner-batch", type=int, help="runs vmapped together per device "
                     "(default 32 on CPU, 4096 on GPU)")
    run.add_argument("--no-figures", action="store_true", help="write tables only")
    return p


def fail(message: str, code: int = 2) -> int:
    print(f"calibjax: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("chunk_size", "inner_batch"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            return fail(f"--{name.replace('_', '-')}: expected a positive integer, got {v}")
    configure_cpu_devices()
    from calibjax import engine, sweep

    try:
        sw = sweep.load(args.sweep)
        out = Path(args.out) if args.out else Path("results") / sw.name
        if args.command == "run":
            layout = engine.default_layout(args.chunk_size, args.inner_batch)
            report = engine.run_sweep(sw, out, layout=layout, overwrite=args.overwrite, quiet=args.quiet,
                                      figures=not args.no_figures)
    except sweep.SweepError as e:
        return fail(str(e))
    print(f"{sw.name}: {report.trained} runs trained ({report.runs} in the sweep) in {report.wall_s:.1f} s; "
          f"{report.steps_per_s:,.0f} model-steps/s; {report.compiles} compiles, {report.compile_s:.1f} s "
          f"compiling; results in {out}")
    if report.failed:
        return fail(f"{len(report.failed)} chunk(s) failed: {', '.join(report.failed)}; "
                    "run the same command again to retry them", code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
