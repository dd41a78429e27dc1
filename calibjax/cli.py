"""Command line: parse arguments, call the library (``calibjax.pipeline`` and friends), map errors
to exit codes. A user's mistake (any ``CalibjaxError``, or a file that cannot be written) exits 2
with one line; failed chunks or missing runs exit 1; SIGINT, SIGTERM and SIGUSR1 exit 130, 143
and 138 after one line saying what was kept. Defaults are the library's, imported, never repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from calibjax.errors import CalibjaxError


def build_parser() -> argparse.ArgumentParser:
    from calibjax import __version__

    p = argparse.ArgumentParser(
        prog="calibjax",
        description="Measure how well classifiers learn the exact Bayesian posterior, "
        "over sweeps of thousands of runs.",
    )
    p.add_argument("--version", action="version", version=f"calibjax {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every unfinished run of a sweep file; write tables and figures")
    plan = sub.add_parser("plan", help="print runs, groups (compiles), chunks, memory and time; train nothing")
    for q in (run, plan):
        q.add_argument(
            "sweep",
            help="sweep file (TOML), e.g. sweeps/blog.toml, or the name of a shipped sweep "
            "(calibjax sweeps lists them)",
        )
        q.add_argument("--out", help="results directory (default results/<sweep name>)")
        _layout_options(q)
        q.add_argument(
            "--shard",
            help="K/N: only runs with run_id %% N == K, into DIR/shards/K-of-N "
            "(default from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT when set)",
        )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the results of another sweep (or of other numbers) in --out"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--no-figures", action="store_true", help="write tables only")
    run.add_argument("--refresh-minutes", type=float, default=5.0, help="partial report every M min or more (0: never)")
    _submit_parser(sub)
    _status_parser(sub)
    sub.add_parser(
        "report", help="write DIR/report.html (run and merge write it too); of an unfinished sweep, partial"
    ).add_argument("dir", help="results directory")
    sub.add_parser("sweeps", help="list the sweep files shipped with calibjax (copy one with calibjax init NAME)")
    init = sub.add_parser("init", help="copy a shipped sweep file (calibjax sweeps lists them) here, to edit and run")
    init.add_argument("name", help="a shipped sweep, e.g. blog or grid_2000 (or slurm_array.sh)")
    init.add_argument("--to", default=".", help="directory to copy it into (default: the current one)")
    merge = sub.add_parser("merge", help="join the shard parts of a results directory; report missing runs")
    merge.add_argument("dir", help="results directory")
    merge.add_argument("--no-figures", action="store_true", help="write tables only")
    _analysis_parsers(sub)
    _export_parser(sub)
    return p


def _status_parser(sub) -> None:
    status = sub.add_parser(
        "status", help="runs done and missing per shard and group; the command that trains what is missing"
    )
    status.add_argument("dir", help="results directory")
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=10.0,
        metavar="SECONDS",
        help="look again every SECONDS (default 10) with the rate and the time left, until every run is done",
    )


def _export_parser(sub) -> None:
    from calibjax.storage.tensorboard import BY, RUNS_PER_FILE_LIMIT

    export = sub.add_parser(
        "export",
        help="write the tables as labelled arrays (grid axes x seed x step ...) in netCDF or zarr, for xarray; "
        "or the runs as TensorBoard runs (--tensorboard LOGDIR)",
    )
    export.add_argument("dir", help="results directory")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", choices=("netcdf", "zarr"))
    what.add_argument("--tensorboard", metavar="LOGDIR", help="write LOGDIR/<sweep>/<run>: metrics against step")
    export.add_argument(
        "--table", action="append", help="a table to export (repeatable; default: every table of runs present)"
    )
    export.add_argument("--output", help="folder for the files (default: DIR/export)")
    by = f"TensorBoard: a run per run, or per grid point (medians over seeds); per run up to {RUNS_PER_FILE_LIMIT:,}"
    export.add_argument("--by", choices=BY, help=by)


def _layout_options(q: argparse.ArgumentParser, passed_on: bool = False) -> None:
    """How a sweep is trained: chunk size, vectorisation width, dense path, size limit (run, plan, submit)."""
    from calibjax.execution import kernel_loader, planning
    from calibjax.sweep import MAX_RUNS

    on = " (passed to calibjax run)" if passed_on else ""
    q.add_argument(
        "--chunk-size",
        type=int,
        help=f"most runs per chunk, the unit written and resumed (default: by memory, at most "
        f"{planning.CPU_MAX_CHUNK} on CPU, {planning.GPU_MAX_CHUNK} on GPU){on}",
    )
    q.add_argument(
        "--inner-batch",
        type=int,
        help=f"runs vmapped together per device (default {planning.CPU_INNER_BATCH} on CPU, "
        f"{planning.GPU_INNER_BATCH} on GPU); part of every run's numbers, so a results directory keeps one{on}",
    )
    q.add_argument(
        "--dense",
        choices=kernel_loader.CHOICES,
        help="how the dense layers are computed: auto (default: calibjax's CPU kernel on CPU where it builds, "
        "else XLA), kernel, or xla (XLA's dot); also $CALIBJAX_DENSE; part of every run's numbers, so a results "
        f"directory keeps one{on}",
    )
    q.add_argument(
        "--max-runs",
        type=int,
        default=MAX_RUNS,
        help=f"refuse sweeps with more runs than this (default {MAX_RUNS:,}), before expanding them",
    )
    if not passed_on:
        q.add_argument(
            "--chunk-minutes",
            type=float,
            default=planning.DEFAULT_CHUNK_MINUTES,
            help=f"most work per chunk at a nominal rate (default {planning.DEFAULT_CHUNK_MINUTES:g}): an interruption "
            "loses at most about this much",
        )


def _submit_parser(sub) -> None:
    from calibjax.cluster import Submission

    default = {f.name: f.default for f in dataclasses.fields(Submission)}
    subm = sub.add_parser(
        "submit",
        help="run a sweep on a SLURM cluster: a job array of shards and a merge job",
        description="Submits a job array (task K trains shard K of --tasks) and a merge job that "
        "runs after the array however it ended. Scripts and logs go to DIR/slurm/. Arguments "
        "after -- go to sbatch for both jobs (e.g. -- --account=lab --qos=long).",
    )
    subm.add_argument("sweep", help="sweep file (TOML)")
    subm.add_argument(
        "--tasks", type=int, required=True, help="array size = number of shards, fixed once per results directory"
    )
    subm.add_argument("--max-parallel", type=int, help="most array tasks running at once (sbatch --array=...%%P)")
    subm.add_argument(
        "--cpus",
        type=int,
        default=default["cpus"],
        help=f"CPUs per task (default {default['cpus']}); calibjax uses one device each",
    )
    subm.add_argument(
        "--mem",
        default=default["mem"],
        help=f"memory per task (default {default['mem']}); chunks are planned within it",
    )
    subm.add_argument(
        "--time", default=default["time"], help=f"time limit per task attempt (default {default['time']})"
    )
    subm.add_argument("--gres", help="generic resources per task, e.g. gpu:1")
    subm.add_argument("--partition", help="SLURM partition")
    subm.add_argument("--only", help="submit only these shards, e.g. 2,5-7 (what calibjax status prints)")
    subm.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch lines; submit nothing")
    subm.add_argument("--out", help="results directory (default results/<sweep name>)")
    _layout_options(subm, passed_on=True)


def _analysis_parsers(sub) -> None:
    from calibjax.analysis import FIGURE_KINDS
    from calibjax.analysis.summaries import DEFAULT_EPS, DEFAULT_REL_EPS

    summ = sub.add_parser("summarize", help="write summary.parquet (per run) and summary_by_setting.parquet")
    summ.add_argument("dir", help="results directory")
    summ.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=list(DEFAULT_EPS),
        help="kl thresholds (nats) for steps_to_kl_<eps> and sustained_kl_<eps> (default "
        f"{' '.join(f'{e:g}' for e in DEFAULT_EPS)})",
    )
    summ.add_argument(
        "--rel-eps",
        type=float,
        nargs="+",
        default=list(DEFAULT_REL_EPS),
        help="kl_rel thresholds (share of I(C;X) still missing) for steps_to_kl_rel_<eps> and "
        f"sustained_kl_rel_<eps> (default {' '.join(f'{e:g}' for e in DEFAULT_REL_EPS)})",
    )
    plot = sub.add_parser(
        "plot",
        help="draw figures from a results directory's tables (no training)",
        description="kinds: standard (the default set), heatmap (--x --y --value "
        "[--facet]), density (error by density bin x steps), reliability (--step)",
    )
    plot.add_argument("dir", help="results directory")
    plot.add_argument("kind", nargs="?", default=FIGURE_KINDS[0], choices=FIGURE_KINDS)
    plot.add_argument("--x", help="heatmap: swept setting on the x axis (a runs.parquet column)")
    plot.add_argument("--y", help="heatmap: swept setting on the y axis")
    plot.add_argument(
        "--value",
        help="heatmap: a summary, e.g. steps_to_kl_rel_0.1, sustained_kl_0.01, final_kl, "
        "kl_auc; density: max_err, kl_mean or kl_contribution",
    )
    plot.add_argument("--facet", help="heatmap: one panel per value of this setting")
    plot.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="density, reliability: runs with this setting (repeatable; a number picks the nearest "
        "existing value within half the axis spacing); seeds are pooled",
    )
    plot.add_argument("--run-id", type=int, help="density, reliability: one run")
    plot.add_argument("--step", type=int, help="reliability: checkpoint (default: the last)")
    plot.add_argument("--output", help="file to write (default DIR/figures/<kind>_....png)")


class UsageError(CalibjaxError):
    """A command line that asks for something impossible (the arguments, not a file, are wrong)."""


class Interrupted(KeyboardInterrupt):
    pass


# SIGUSR1 is the early warning calibjax submit asks SLURM to send before a task's time limit.
SIGNALS = {signal.SIGINT: ("SIGINT", 130), signal.SIGTERM: ("SIGTERM", 143), signal.SIGUSR1: ("SIGUSR1", 138)}


@dataclass
class Session:
    """One invocation: the signals it received (even if a library swallowed the exception raised for
    one) and, once a sweep trains, the library's report of it (what an interruption says)."""

    received: list[int] = field(default_factory=list)
    report: object | None = None  # calibjax.execution.engine.Report

    def on_signal(self, signum, frame):
        self.received.append(signum)
        raise Interrupted(signum)

    def stop(self) -> bool:
        return bool(self.received)


def fail(message: str, code: int = 2) -> int:
    print(f"calibjax: error: {message}", file=sys.stderr)
    return code


def _quiet_unraisable(hook):
    """Python prints an exception raised where it cannot propagate (a gc callback of JAX's, say) and
    goes on; for our own Interrupted that print is noise: the session's flag still stops us."""

    def unraisable(u):
        if not isinstance(u.exc_value, Interrupted):
            hook(u)

    return unraisable


def main(argv: list[str] | None = None) -> int:
    """Run the command line. SIGINT and SIGTERM stop it within a second or so, keep finished chunks,
    print one line and exit 130 or 143."""
    session = Session()
    for s in SIGNALS:
        signal.signal(s, session.on_signal)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    try:
        code = dispatch(argv, session)
    except KeyboardInterrupt:
        code = None
    if session.received or code is None:
        print(interruption(session), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        signum = session.received[0] if session.received else signal.SIGINT
        os._exit(SIGNALS[signum][1])  # at once: a chunk abandoned in its worker thread must not hold the exit
    return code


def interruption(session: Session) -> str:
    """The line an interrupted command ends with: what was kept, and what to do next."""
    signum = session.received[0] if session.received else signal.SIGINT
    name = SIGNALS[signum][0]
    report = session.report
    if report is None or report.sweep is None:
        progress = "nothing trained yet"
    else:
        from calibjax.storage import results

        done = len(results.finished_run_ids(report.out, report.sweep, None))
        progress = (
            f"{report.trained} runs trained by this process, {done} of {len(report.sweep.runs)} done in {report.out}"
        )
    if signum == signal.SIGUSR1 and report is not None:
        return f"calibjax: time limit near ({name}); the chunk in flight is abandoned, finished chunks are kept: " + (
            f"{progress}; {_requeue(report)}"
        )
    return (
        f"calibjax: interrupted by {name}; finished chunks are kept: {progress}; run the same command again to resume"
    )


def _requeue(report) -> str:
    """After the early warning: requeue this SLURM job if this attempt got anywhere, or if it is the
    first (which may have spent its time compiling; the next one finds the program in the cache).
    Otherwise another attempt would be cut off just the same, forever."""
    from calibjax import cluster

    if not report.trained and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        return (
            "not requeued: no chunk finished in this attempt, so another would not get further; resubmit with "
            "a longer --time or a smaller --chunk-minutes (calibjax status prints the command)"
        )
    return cluster.requeue_self()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; what follows -- goes to sbatch (submit only). Bad numbers raise UsageError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    if cut < len(argv) and args.command != "submit":
        raise UsageError("arguments after -- are for sbatch, and only calibjax submit takes them")
    args.sbatch_args = argv[cut + 1 :]
    counts = ("chunk_size", "inner_batch", "max_runs", "tasks", "max_parallel", "cpus")
    for name in (*counts, "chunk_minutes", "watch", "refresh_minutes"):
        v, zero = getattr(args, name, None), name == "refresh_minutes"
        if v is not None and not (v >= 1 if name in counts else (0 <= v if zero else 0 < v) and v < math.inf):
            kind = "integer" if name in counts else "number"
            raise UsageError(f"--{name.replace('_', '-')}: expected {'0 or ' * zero}a positive {kind}, got {v}")
    return args


def dispatch(argv: list[str] | None, session: Session) -> int:
    try:
        args = parse_args(argv)
        return COMMANDS[args.command](args, session)
    except CalibjaxError as e:
        return fail(str(e))
    except OSError as e:  # a full disk, a read-only or vanished directory: say which file, no traceback
        return fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))


def _setup() -> None:
    from calibjax.execution import runtime

    runtime.setup()  # before any JAX computation: CPU devices, compilation cache


def _layout_kw(args) -> dict:
    return {k: getattr(args, k) for k in ("chunk_size", "inner_batch", "dense", "chunk_minutes", "shard", "max_runs")}


def cmd_run(args, session: Session) -> int:
    from calibjax import pipeline
    from calibjax.execution import engine

    _setup()
    session.report = report = engine.Report()
    pipeline.run(
        args.sweep,
        args.out,
        **_layout_kw(args),
        overwrite=args.overwrite,
        figures=not args.no_figures,
        quiet=args.quiet,
        stop=session.stop,
        report=report,
        refresh_minutes=args.refresh_minutes,
    )
    name = report.sweep.name
    if not report.chunks:
        print(f"{name}: results in {report.where}")
        return missing_runs(report)
    print(
        f"{name}: {report.trained} runs trained ({report.runs} in the sweep) in {report.wall_s:.1f} s; "
        f"{report.steps_per_s:,.0f} model-steps/s; {report.compiles} compiles, {report.compile_s:.1f} s "
        f"compiling; results in {report.where}"
    )
    if report.failed:
        return fail(
            f"{len(report.failed)} chunk(s) failed: {', '.join(report.failed)}; "
            "run the same command again to retry them",
            code=1,
        )
    if report.shard:
        print(f"when every shard has finished: calibjax merge {report.out}")
    return missing_runs(report)


def missing_runs(report) -> int:
    """Exit 1 when an unsharded run ends with runs missing although no chunk failed (a finished
    chunk holding other runs than its name says): the tables are incomplete, and 0 would hide it."""
    if not report.missing:
        return 0
    shown = ", ".join(map(str, report.missing[:20])) + (" ..." if len(report.missing) > 20 else "")
    return fail(
        f"{report.out}: {len(report.missing)} run(s) still missing after every chunk finished (run_id {shown}): "
        f"a finished chunk holds other runs than its name says; calibjax status {report.out} shows them",
        code=1,
    )


def cmd_plan(args, session: Session) -> int:
    from calibjax import pipeline

    _setup()
    p = pipeline.plan(args.sweep, args.out, **_layout_kw(args))
    if p.note:
        print(f"note: {p.note}")
    for line in p.warnings:
        print(f"note: {line}")
    print(
        f"{p.sweep.name}: {len(p.sweep.runs)} runs, {len(p.sweep.block_groups[0])} groups (one compile each); "
        f"{len(p.done)} already finished in {p.out}; {len(p.layout.devices)} {p.layout.backend} device(s)"
    )
    if len(p.table):
        print(p.table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
        print(
            f"total: {p.table['runs'].sum()} runs to train in {p.table['chunks'].sum()} chunks, "
            f"about {p.table['est_seconds'].sum() / 60:,.1f} min (rough: from a measured matmul rate)"
        )
    return 0


def cmd_merge(args, session: Session) -> int:
    from calibjax import cluster, pipeline

    _setup()
    missing = pipeline.merge(args.dir, figures=not args.no_figures)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        print(cluster.format_status(cluster.status(Path(args.dir))))
        return fail(
            f"{args.dir}: {len(missing)} run(s) missing: run_id {shown}; "
            "train them (the command above), then merge again",
            code=1,
        )
    print(f"{args.dir}: merged; every run present")
    return 0


def cmd_status(args, session: Session) -> int:
    from calibjax import cluster

    if args.watch is None:
        print(cluster.format_status(cluster.status(Path(args.dir))))
        return 0
    clear = "\033[H\033[J" if sys.stdout.isatty() else ""  # (a log gets one block per look)
    try:
        cluster.watch(Path(args.dir), args.watch, lambda text: print(clear + text + "\n", flush=True), session.stop)
    except KeyboardInterrupt:
        pass
    session.received.clear()  # Ctrl-C ends the watch: nothing was interrupted
    return 0


def cmd_report(args, session: Session) -> int:
    from calibjax import pipeline

    print(pipeline.report(Path(args.dir)))
    return 0


def cmd_sweeps(args, session: Session) -> int:
    from calibjax.sweep import shipped

    for name, runs, about in shipped.listing():
        print(f"{name:<20} {runs:>7,} runs  {about}")
    print("copy one to edit: calibjax init NAME; run it: calibjax run NAME.toml")
    return 0


def cmd_init(args, session: Session) -> int:
    from calibjax.sweep import shipped

    target = shipped.copy(args.name, args.to)
    print(f"{target}" + (f"; run it with: calibjax run {target}" if target.suffix == ".toml" else ""))
    return 0


def cmd_submit(args, session: Session) -> int:
    from calibjax import cluster
    from calibjax.pipeline import open_sweep, results_dir

    sw = open_sweep(args.sweep, args.max_runs)
    out = str(results_dir(sw, args.out))
    run_args = []
    for flag in ("chunk_size", "inner_batch", "dense"):
        if getattr(args, flag) is not None:
            run_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    sub = cluster.Submission(
        sweep=args.sweep,
        out=out,
        tasks=args.tasks,
        max_parallel=args.max_parallel,
        cpus=args.cpus,
        mem=args.mem,
        time=args.time,
        gres=args.gres,
        partition=args.partition,
        run_args=tuple(run_args),
        sbatch_args=tuple(args.sbatch_args),
        only=cluster.parse_only(args.only, args.tasks) if args.only else (),
    )
    record = cluster.submit(sub, sw, dry_run=args.dry_run)
    if record:
        print(
            f"{sw.name}: submitted array job {record['array_job']} ({len(record['shards'])} task(s) of "
            f"{args.tasks} shards, {len(sw.runs)} runs) and merge job {record['merge_job']} (runs after the array, "
            f"however it ends); logs in {out}/slurm/"
        )
        print(f"progress: calibjax status {out}")
    return 0


def cmd_summarize(args, session: Session) -> int:
    from calibjax.analysis import summaries
    from calibjax.storage import reader

    summary, agg = summaries.write_summaries(reader.require_results(args.dir), args.eps, args.rel_eps)
    print(f"{args.dir}: summary.parquet ({len(summary)} runs), summary_by_setting.parquet ({len(agg)} settings)")
    return 0


def cmd_plot(args, session: Session) -> int:
    from calibjax.analysis import figures

    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--where {item!r}: expected KEY=VALUE")
        where[key] = value
    paths = figures.draw(
        args.dir,
        args.kind,
        x=args.x,
        y=args.y,
        value=args.value,
        facet=args.facet,
        where=where,
        run_id=args.run_id,
        step=args.step,
        output=args.output,
    )
    print("\n".join(map(str, paths)))
    return 0


def cmd_export(args, session: Session) -> int:
    from calibjax.storage import arrays

    if (args.table or args.output) if args.tensorboard else args.by:
        raise arrays.ExportError("--table and --output go with --format, --by with --tensorboard")
    if args.tensorboard:
        from calibjax.storage.tensorboard import export_tensorboard

        written = export_tensorboard(args.dir, args.tensorboard, args.by)
        print(f"{len(written)} TensorBoard run(s) in {written[0].parent}: tensorboard --logdir {args.tensorboard}")
        return 0
    for path in arrays.export(args.dir, args.format, args.table, args.output):
        print(path)
    return 0


COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "merge": cmd_merge,
    "status": cmd_status,
    "report": cmd_report,
    "sweeps": cmd_sweeps,
    "init": cmd_init,
    "submit": cmd_submit,
    "summarize": cmd_summarize,
    "plot": cmd_plot,
    "export": cmd_export,
}

if __name__ == "__main__":
    sys.exit(main())
