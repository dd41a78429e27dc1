"""Command line: parse arguments, call the library. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tomllib
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="calibjax",
        description="Measure how well classifiers learn the exact "
        "Bayesian posterior, over sweeps of thousands of runs.",
    )
    from calibjax import __version__

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
        q.add_argument(
            "--chunk-size",
            type=int,
            help="most runs per chunk, the unit written and resumed (default: "
            "by memory, at most 1024 on CPU, 16384 on GPU)",
        )
        q.add_argument(
            "--inner-batch",
            type=int,
            help="runs vmapped together per device (default 8 on CPU, "
            "1024 on GPU); part of every run's numbers, so a results directory keeps one",
        )
        q.add_argument(
            "--dense",
            choices=("auto", "kernel", "xla"),
            help="how the dense layers are "
            "computed: auto (default: calibjax's CPU kernel on CPU where it builds, else XLA), kernel, or "
            "xla (XLA's dot); also $CALIBJAX_DENSE; part of every run's numbers, so a results "
            "directory keeps one",
        )
        q.add_argument(
            "--shard",
            help="K/N: only runs with run_id %% N == K, into DIR/shards/K-of-N "
            "(default from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT when set)",
        )
        q.add_argument(
            "--max-runs",
            type=int,
            default=None,
            help="refuse sweeps with more runs than this (default 10,000,000), before expanding them",
        )
        q.add_argument(
            "--chunk-minutes",
            type=float,
            default=5.0,
            help="most work per chunk at a nominal rate (default 5): an interruption loses at most about this much",
        )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the results of another sweep (or of other numbers) in --out"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--no-figures", action="store_true", help="write tables only")
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
    subm.add_argument("--cpus", type=int, default=2, help="CPUs per task (default 2); calibjax uses one device each")
    subm.add_argument("--mem", default="4G", help="memory per task (default 4G); calibjax plans chunks within it")
    subm.add_argument("--time", default="04:00:00", help="time limit per task attempt (default 04:00:00)")
    subm.add_argument("--gres", help="generic resources per task, e.g. gpu:1")
    subm.add_argument("--partition", help="SLURM partition")
    subm.add_argument("--only", help="submit only these shards, e.g. 2,5-7 (what calibjax status prints)")
    subm.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch lines; submit nothing")
    subm.add_argument("--out", help="results directory (default results/<sweep name>)")
    subm.add_argument("--chunk-size", type=int, help="passed to calibjax run")
    subm.add_argument("--inner-batch", type=int, help="passed to calibjax run")
    subm.add_argument("--dense", choices=("auto", "kernel", "xla"), help="passed to calibjax run")
    subm.add_argument("--max-runs", type=int, default=None, help="refuse sweeps with more runs than this")
    stat = sub.add_parser(
        "status", help="runs done and missing per shard and group; the command that trains what is missing"
    )
    stat.add_argument("dir", help="results directory")
    rep = sub.add_parser(
        "report",
        help="write DIR/report.html: one self-contained page with the sweep, run facts, "
        "summary table and every figure (run and merge write it too)",
    )
    rep.add_argument("dir", help="results directory")
    sub.add_parser("sweeps", help="list the sweep files shipped with calibjax (copy one with calibjax init NAME)")
    init = sub.add_parser("init", help="copy a shipped sweep file (calibjax sweeps lists them) here, to edit and run")
    init.add_argument("name", help="a shipped sweep, e.g. blog or grid_2000 (or slurm_array.sh)")
    init.add_argument("--to", default=".", help="directory to copy it into (default: the current one)")
    merge = sub.add_parser("merge", help="join the shard parts of a results directory; report missing runs")
    merge.add_argument("dir", help="results directory")
    merge.add_argument("--no-figures", action="store_true", help="write tables only")
    summ = sub.add_parser("summarize", help="write summary.parquet (per run) and summary_by_setting.parquet")
    summ.add_argument("dir", help="results directory")
    summ.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=[1e-2, 1e-3],
        help="kl thresholds (nats) for steps_to_kl_<eps> and sustained_kl_<eps> (default 0.01 0.001)",
    )
    summ.add_argument(
        "--rel-eps",
        type=float,
        nargs="+",
        default=[0.1, 0.01],
        help="kl_rel thresholds (share of I(C;X) still missing) for steps_to_kl_rel_<eps> and "
        "sustained_kl_rel_<eps> (default 0.1 0.01)",
    )
    plot = sub.add_parser(
        "plot",
        help="draw figures from a results directory's tables (no training)",
        description="kinds: standard (the default set), heatmap (--x --y --value "
        "[--facet]), density (error by density bin x steps), reliability (--step)",
    )
    plot.add_argument("dir", help="results directory")
    plot.add_argument("kind", nargs="?", default="standard", choices=["standard", "heatmap", "density", "reliability"])
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
    return p


def fail(message: str, code: int = 2) -> int:
    print(f"calibjax: error: {message}", file=sys.stderr)
    return code


class UsageError(ValueError):
    pass


# SIGUSR1 is the early warning calibjax submit asks SLURM to send before a task's time limit.
SIGNALS = {signal.SIGINT: ("SIGINT", 130), signal.SIGTERM: ("SIGTERM", 143), signal.SIGUSR1: ("SIGUSR1", 138)}
_received: list[int] = []  # signals seen, even if a library swallowed the exception raised for one


class Interrupted(KeyboardInterrupt):
    pass


def _on_signal(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


def _quiet_unraisable(hook):
    """Python prints an exception raised where it cannot propagate (a gc callback of JAX's, say) and
    goes on; for our own Interrupted that print is noise: the flag in _received still stops us."""

    def unraisable(u):
        if not isinstance(u.exc_value, Interrupted):
            hook(u)

    return unraisable


def main(argv: list[str] | None = None) -> int:
    """Run the command line. SIGINT and SIGTERM stop it within a second or so, keep finished chunks,
    print one line and exit 130 or 143."""
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        code = None
    if _received or code is None:
        signum = _received[0] if _received else signal.SIGINT
        name, code = SIGNALS.get(signum)
        if signum == signal.SIGUSR1 and _running:
            print(
                f"calibjax: time limit near ({name}); the chunk in flight is abandoned, finished chunks are "
                f"kept: {_progress()}; {_requeue()}",
                file=sys.stderr,
            )
        else:
            print(
                f"calibjax: interrupted by {name}; finished chunks are kept: {_progress()}; run the same "
                "command again to resume",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # at once: a chunk abandoned in its worker thread must not hold the exit
    return code


_running: tuple = ()  # (sweep, out, report) once a sweep starts training: what an interruption reports


def _progress() -> str:
    if not _running:
        return "nothing trained yet"
    from calibjax import results

    sw, out, report = _running
    return (
        f"{report.trained} runs trained by this process, {len(results.finished_run_ids(out, sw))} of "
        f"{len(sw.runs)} done in {out}"
    )


def _requeue() -> str:
    """After the early warning: requeue this SLURM job if this attempt got anywhere, or if it is the
    first (which may have spent its time compiling; the next one finds the program in the cache).
    Otherwise another attempt would be cut off just the same, forever."""
    from calibjax import cluster

    if not _running[2].trained and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        return (
            "not requeued: no chunk finished in this attempt, so another would not get further; resubmit with "
            "a longer --time or a smaller --chunk-minutes (calibjax status prints the command)"
        )
    return cluster.requeue_self()


def _main(argv: list[str] | None = None) -> int:
    global _running
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # submit: what follows -- is for sbatch
    args = build_parser().parse_args(argv[:cut])
    if cut < len(argv) and args.command != "submit":
        return fail("arguments after -- are for sbatch, and only calibjax submit takes them")
    args.sbatch_args = argv[cut + 1 :]
    for name in ("chunk_size", "inner_batch", "max_runs", "chunk_minutes"):
        v = getattr(args, name, None)
        if v is not None and (v <= 0 if name == "chunk_minutes" else v < 1):
            return fail(
                f"--{name.replace('_', '-')}: expected a positive "
                f"{'number' if name == 'chunk_minutes' else 'integer'}, got {v}"
            )
    from calibjax import cluster, runtime, store, sweep

    try:
        if args.command in ("summarize", "plot"):
            return analyse(args)
        if args.command == "status":
            st = cluster.status(Path(args.dir))
            print(cluster.format_status(st))
            return 0
        if args.command == "submit":
            return submit(args)
        if args.command in ("sweeps", "init"):
            return shipped(args)
        if args.command == "report":
            from calibjax import report as page

            print(page.write_report(Path(args.dir)))
            return 0
        runtime.setup()  # before any JAX computation: CPU devices, compilation cache
        if args.command == "merge":
            return merge(args)
        sw = sweep.load(sweep_file(args.sweep), **({"max_runs": args.max_runs} if args.max_runs else {}))
        out = Path(args.out) if args.out else Path("results") / sw.name
        shard, first = cluster.resolve_shard(args.shard, store.read_manifest(out), out) or (None, 0)
        from calibjax import engine, planning

        layout = planning.default_layout(
            args.chunk_size,
            args.inner_batch,
            max_chunk_s=60 * args.chunk_minutes,
            dense=planning.dense_choice(args.dense, store.read_manifest(out)),
        )
        if args.command == "plan":
            return print_plan(sw, out, layout, shard)
        report = engine.Report()
        _running = (sw, out, report)
        engine.run_sweep(
            sw,
            out,
            layout=layout,
            shard=shard,
            shard_first=first,
            overwrite=args.overwrite,
            quiet=args.quiet,
            stop=lambda: bool(_received),
            report=report,
        )
        if report.complete:
            finish(out, figures=not args.no_figures)
    except (sweep.SweepError, UsageError, runtime.SetupError, store.CorruptResults, cluster.ClusterError) as e:
        return fail(str(e))
    except OSError as e:  # a full disk, a read-only or vanished directory: say which file, no traceback
        return fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
    where = f"{out}/shards/{shard[0]}-of-{shard[1]}" if shard else str(out)
    if not report.chunks:
        print(f"{sw.name}: results in {where}")
        return 0
    print(
        f"{sw.name}: {report.trained} runs trained ({report.runs} in the sweep) in {report.wall_s:.1f} s; "
        f"{report.steps_per_s:,.0f} model-steps/s; {report.compiles} compiles, {report.compile_s:.1f} s "
        f"compiling; results in {where}"
    )
    if report.failed:
        return fail(
            f"{len(report.failed)} chunk(s) failed: {', '.join(report.failed)}; "
            "run the same command again to retry them",
            code=1,
        )
    if shard:
        print(f"when every shard has finished: calibjax merge {out}")
    return 0


def finish(out: Path, figures: bool = True) -> None:
    """After the final tables: summaries, then (unless turned off) the standard figures, then the
    HTML report."""
    from calibjax import report, summaries

    summaries.write_summaries(out)
    if figures:
        from calibjax import plots

        plots.standard_figures(out)
    report.write_report(out)


def merge(args) -> int:
    from calibjax import cluster, results

    missing = results.merge(args.dir)
    if (Path(args.dir) / "metrics.parquet").exists():  # (no run finished at all: nothing to summarize)
        finish(Path(args.dir), figures=not args.no_figures)  # summaries and figures of exactly the runs present
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


def shipped_files() -> dict:
    """The files shipped in calibjax.sweeps, by name (importlib.resources Traversables)."""
    from importlib import resources

    return {p.name: p for p in resources.files("calibjax.sweeps").iterdir() if p.name.endswith((".toml", ".sh"))}


def sweep_file(text: str) -> str:
    """A sweep file argument: a path, or else the name of a shipped sweep (blog, grid_2000, ...)."""
    if Path(text).exists():
        return text
    files = shipped_files()
    name = text if text.endswith(".toml") else f"{text}.toml"
    if "/" not in text and name in files:
        print(
            f"calibjax: {text}: not a file here; using the shipped sweep {name} (calibjax init "
            f"{name[:-5]} copies it to edit)",
            file=sys.stderr,
        )
        return str(files[name])
    return text  # sweep.load says it cannot be read


def shipped(args) -> int:
    """calibjax sweeps (list the shipped sweep files) and calibjax init NAME (copy one here)."""
    from calibjax import sweep

    files = shipped_files()
    if args.command == "sweeps":
        for name in sorted(n for n in files if n.endswith(".toml")):
            text = files[name].read_text()
            doc = tomllib.loads(text)
            sw = sweep.parse(doc, name, text)
            about = doc.get("description") or next(
                (line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), ""
            )
            print(f"{name[:-5]:<20} {len(sw.runs):>7,} runs  {about}")
        print("copy one to edit: calibjax init NAME; run it: calibjax run NAME.toml")
        return 0
    name = args.name if args.name in files else f"{args.name}.toml"
    if name not in files:
        raise UsageError(
            f"init {args.name}: no such shipped sweep; shipped: "
            f"{', '.join(sorted(n.removesuffix('.toml') for n in files))}"
        )
    target = Path(args.to) / name
    if target.exists():
        raise UsageError(f"{target}: exists already; calibjax init never overwrites a file (use --to DIR)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(files[name].read_text())
    if name.endswith(".sh"):
        target.chmod(0o755)
    print(f"{target}" + (f"; run it with: calibjax run {target}" if name.endswith(".toml") else ""))
    return 0


def submit(args) -> int:
    from calibjax import cluster, sweep

    for name in ("tasks", "max_parallel", "cpus"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {v}")
    sw = sweep.load(sweep_file(args.sweep), **({"max_runs": args.max_runs} if args.max_runs else {}))
    if args.tasks > len(sw.runs):
        raise UsageError(f"--tasks {args.tasks}: more shards than the sweep's {len(sw.runs)} runs")
    out = args.out or str(Path("results") / sw.name)
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
    cluster.parse_minutes(sub.time)  # a bad --time is refused before anything is written
    record = cluster.submit(sub, sw, dry_run=args.dry_run)
    if record:
        print(
            f"{sw.name}: submitted array job {record['array_job']} ({len(record['shards'])} task(s) of "
            f"{args.tasks} shards, {len(sw.runs)} runs) and merge job {record['merge_job']} (runs after the array, "
            f"however it ends); logs in {out}/slurm/"
        )
        print(f"progress: calibjax status {out}")
    return 0


def analyse(args) -> int:
    """summarize and plot: tables in, tables and figures out."""
    from calibjax import plots, summaries

    out = Path(args.dir)
    if not (out / "runs.parquet").exists() or not (out / "metrics.parquet").exists():
        raise UsageError(f"{out}: no runs.parquet and metrics.parquet here; run or merge a sweep first")
    if args.command == "summarize":
        summary, agg = summaries.write_summaries(out, args.eps, args.rel_eps)
        print(f"{out}: summary.parquet ({len(summary)} runs), summary_by_setting.parquet ({len(agg)} settings)")
        return 0
    try:
        if args.kind == "standard":
            if not (out / "summary_by_setting.parquet").exists():
                summaries.write_summaries(out)
            paths = plots.standard_figures(out)
        else:
            paths = [plot_one(args, out)]
    except plots.PlotError as e:
        raise UsageError(str(e)) from None
    print("\n".join(map(str, paths)))
    return 0


def plot_one(args, out: Path) -> Path:
    from calibjax import plots, store, summaries

    t = store.Results(out)
    runs = t["runs"]
    fig = out / "figures"
    if args.kind == "heatmap":
        missing = [f"--{n}" for n in ("x", "y", "value") if getattr(args, n) is None]
        if missing:
            raise plots.PlotError(f"heatmap needs {', '.join(missing)}")
        if args.value is not None and "summary_by_setting" not in t:
            t["summary_by_setting"] = summaries.write_summaries(out)[1]
        agg = t["summary_by_setting"]
        path = Path(args.output or fig / f"heatmap_{args.value}_{args.x}_{args.y}.png")
        return plots.heatmap(agg, args.x, args.y, args.value, path, args.facet, runs=runs)
    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep:
            raise plots.PlotError(f"--where {item!r}: expected KEY=VALUE")
        where[key] = value
    ids = plots.select_runs(runs, where, args.run_id)
    label = (
        f"run {args.run_id}"
        if args.run_id is not None
        else (", ".join(f"{k}={v}" for k, v in where.items()) or "all runs")
    )
    if args.run_id is not None:  # name the run by its settings
        row = runs.loc[runs["run_id"] == args.run_id].iloc[0]
        label += (
            " ("
            + ", ".join(
                f"{c}={plots.fmt(row[c])}" for c in ["case", *summaries.swept_columns(runs), "seed"] if c in row
            )
            + ")"
        )
    elif pooled := plots.pooled_axes(runs, ids):
        label += f"; {pooled}"
    tag = "_".join(f"{k}-{v}" for k, v in where.items()) or (f"run{args.run_id}" if args.run_id is not None else "all")
    if args.kind == "density":
        path = Path(args.output or fig / f"density_{tag}.png")
        return plots.density_map(t["density"], ids, path, args.value or "max_err", title=label)
    step = args.step if args.step is not None else int(t["metrics"]["step"].max())
    path = Path(args.output or fig / f"reliability_{tag}_step{step}.png")
    return plots.reliability(t["calibration"], ids, step, path, title=f"{label}, step {step}")


def print_plan(sw, out: Path, layout, shard) -> int:
    from calibjax import planning, results, store

    manifest, done = store.read_manifest(out), set()
    if manifest is not None:
        try:  # what run would do: reuse these results only if run would accept them
            results.check_same_numbers(
                manifest,
                out,
                sw.name,
                layout.identity,
                "run would refuse them; with --overwrite it would train every run",
            )
            done = results.finished_run_ids(out, sw)
        except results.ResultsExist as e:
            print(f"note: {e}")
    table = planning.plan(sw, layout, shard, done)
    print(
        f"{sw.name}: {len(sw.runs)} runs, {len(sw.block_groups[0])} groups (one compile each); "
        f"{len(done)} already finished in {out}; {len(layout.devices)} {layout.backend} device(s)"
    )
    if len(table):
        print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
        print(
            f"total: {table['runs'].sum()} runs to train in {table['chunks'].sum()} chunks, "
            f"about {table['est_seconds'].sum() / 60:,.1f} min (rough: from a measured matmul rate)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
