"""The library pipeline: what ``calibjax run``, ``merge`` and ``plan`` do, callable from Python.

    import calibjax

    calibjax.setup()  # before any JAX computation
    report = calibjax.run("sweeps/blog.toml")  # train or resume; final tables, summaries, figures, report
    t = calibjax.load_results(report.out)  # dict of DataFrames: runs, metrics, density, ...

``run`` trains every unfinished run of a sweep (a file, a shipped sweep's name or a ``Sweep``) and,
once every run has finished, writes the summaries, the figures and the HTML report (``finish``).
The command line calls these functions and nothing else; its options are their keywords, and its
stop and progress hooks are their arguments (nothing here keeps state between calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from calibjax import cluster
from calibjax import sweep as sweep_mod
from calibjax.analysis import summaries
from calibjax.analysis.report import write_report
from calibjax.errors import CalibjaxError
from calibjax.execution import engine, planning
from calibjax.storage import files, owned, results
from calibjax.sweep import MAX_RUNS, Sweep, load, shipped


def open_sweep(sweep: str | Path | Sweep, max_runs: int = MAX_RUNS) -> Sweep:
    """A Sweep from a file, or a shipped sweep's name (``calibjax sweeps`` lists them)."""
    return sweep if isinstance(sweep, Sweep) else load(shipped.find(str(sweep)), max_runs=max_runs)


def results_dir(sw: Sweep, out: str | Path | None = None) -> Path:
    """Where a sweep's results go: ``out``, by default results/<sweep name>."""
    return Path(out) if out else Path("results") / sw.name


def _prepare(sweep, out, chunk_size, inner_batch, dense, chunk_minutes, shard, max_runs):
    """What run and plan both start from: the sweep, its results directory, (shard, first array
    task id) from "K/N", (K, N) or, inside a SLURM array, the environment; and the layout (the
    dense path the directory recorded unless asked otherwise)."""
    sw = open_sweep(sweep, max_runs)
    out = results_dir(sw, out)
    manifest = files.read_manifest(out)
    text = f"{shard[0]}/{shard[1]}" if isinstance(shard, tuple) else shard
    shard = cluster.resolve_shard(text, manifest, out) or (None, 0)
    if shard[0] is not None and shard[0][1] > len(sw.runs):
        raise cluster.ClusterError(
            f"--shard {shard[0][0]}/{shard[0][1]}: more shards than the {len(sw.runs)} runs of {sw.path}; "
            f"at most {len(sw.runs)}"
        )
    choice = planning.dense_choice(dense, manifest)  # the path out recorded, unless asked otherwise
    layout = planning.default_layout(chunk_size, inner_batch, max_chunk_s=60 * chunk_minutes, dense=choice)
    return sw, out, shard, layout


REFRESH_MINUTES = 5.0
REFRESH_SHARE = 0.02  # of the run's time since it started, at most, spent on refreshing the report


def run(
    sweep: str | Path | Sweep,
    out: str | Path | None = None,
    *,
    chunk_size: int | None = None,
    inner_batch: int | None = None,
    dense: str | None = None,
    chunk_minutes: float = planning.DEFAULT_CHUNK_MINUTES,
    shard: str | tuple[int, int] | None = None,
    max_runs: int = MAX_RUNS,
    overwrite: bool = False,
    figures: bool = True,
    quiet: bool = False,
    stop=lambda: False,
    report: engine.Report | None = None,
    refresh_minutes: float = REFRESH_MINUTES,
) -> engine.Report:
    """Train every unfinished run of a sweep (or of one shard) into ``out``; once all have
    finished, write the summaries, the figures (unless ``figures=False``) and the HTML report.
    While it trains (unsharded), the report of the runs finished so far is written every
    ``refresh_minutes`` or more (``Refresher``; 0: never).

    ``stop()`` is asked between chunks and while one trains (yes: KeyboardInterrupt, finished
    chunks kept); ``report`` is filled in as chunks finish, so a caller that is interrupted can
    say how far it got. Returns the report (``report.out``: the results directory).
    """
    sw, out, (shard, first), layout = _prepare(
        sweep, out, chunk_size, inner_batch, dense, chunk_minutes, shard, max_runs
    )
    report = report if report is not None else engine.Report()
    engine.run_sweep(
        sw,
        out,
        layout=layout,
        shard=shard,
        shard_first=first,
        overwrite=overwrite,
        quiet=quiet,
        stop=stop,
        report=report,
        after_chunk=Refresher(out, refresh_minutes, figures) if refresh_minutes and shard is None else lambda: None,
    )
    if report.complete:
        finish(out, figures=figures)
    return report


class Refresher:
    """Called after each chunk ``run`` writes: rewrites the partial report (``report``) when at
    least ``minutes`` have passed since the last one and the time spent on it so far, with another
    refresh as long as the last, stays within REFRESH_SHARE of the time since the run started. So
    a sweep spends at most that share on it, and the first refresh (whose cost is not known before),
    however large the report. A refresh that fails says so once; training goes on."""

    def __init__(self, out: Path, minutes: float, figures: bool = True, clock=time.perf_counter):
        self.out, self.every_s, self.figures, self.clock = Path(out), 60 * minutes, figures, clock
        self.start = self.last = clock()
        self.spent, self.cost, self.warned = 0.0, 0.0, False

    def __call__(self) -> None:
        now = self.clock()
        if now - self.last < self.every_s or self.spent + self.cost > REFRESH_SHARE * (now - self.start):
            return
        try:
            report(self.out, figures=self.figures)
        except Exception as e:  # (the report is a view: training goes on)
            if not self.warned:
                print(f"{self.out}: the partial report was not written: {type(e).__name__}: {e}", flush=True)
                self.warned = True
        self.last = self.clock()
        self.cost = self.last - now
        self.spent += self.cost


def finish(out: str | Path, figures: bool = True) -> None:
    """After the final tables: summaries, then (unless turned off) the standard figures, then the
    HTML report; a partial view written while the sweep ran is removed."""
    summaries.write_summaries(out)
    if figures:
        from calibjax.analysis.figures import standard_figures  # (matplotlib: loaded only to draw)

        standard_figures(out)
    write_report(out)
    owned.remove_partial(out)


def report(out: str | Path, figures: bool = True) -> Path:
    """Write ``DIR/report.html``: of the final tables where they hold every run of the sweep;
    otherwise (a sweep still training, stopped, or a cluster array part way) of the runs finished
    so far, marked partial with the share of runs it covers. The partial page is built in
    ``DIR/partial`` (final tables, summaries and figures of the finished runs, joined from the
    chunks as merge would, never touching the directory's own tables or manifest), then copied to
    ``DIR/report.html``. Raises NothingFinished where no run has finished yet."""
    out = Path(out)
    manifest = files.read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out}: no manifest.json here; run or merge a sweep first")
    if manifest.get("complete"):  # (damaged final tables: write_report says which, as before)
        return write_report(out)
    sw, identity = results.manifest_sweep(manifest), results.joined_identity(out, manifest)
    if not results.finished_run_ids(out, sw, identity):
        raise NothingFinished(f"{out}: no run has finished yet ({len(sw.runs):,} in the sweep); nothing to report")
    view = out / files.PARTIAL
    view.mkdir(exist_ok=True)
    files.write_json(view / "manifest.json", {k: v for k, v in manifest.items() if k != "generation"})
    results.finalize(out, sweep_mod.runs_table(sw), identity, into=view)
    summaries.write_summaries(view)
    if figures:
        from calibjax.analysis.figures import standard_figures

        standard_figures(view)
    return write_report(view, to=out / "report.html")


class NothingFinished(CalibjaxError):
    """A partial report was asked for before any run finished."""


def merge(out: str | Path, figures: bool = True) -> list[int]:
    """Join the shard parts of a results directory; then summaries, figures and report of exactly
    the runs present. Returns the run_ids still missing."""
    missing = results.merge(out)
    if (Path(out) / "metrics.parquet").exists():  # (no run finished at all: nothing to summarize)
        finish(out, figures=figures)
    return missing


@dataclass
class Plan:
    """What ``run`` would do: the chunks per group still to train, and why results are not reused."""

    sweep: Sweep
    out: Path
    layout: planning.Layout
    table: pd.DataFrame  # planning.plan: groups, chunks, memory and time
    done: set[int]  # runs already finished in out (that run would keep)
    note: str = ""  # why run would not reuse what out holds ("" if it would, or out is new)
    warnings: list[str] = field(default_factory=list)  # runs that would take long (planning.check_sizes)


def plan(
    sweep: str | Path | Sweep,
    out: str | Path | None = None,
    *,
    chunk_size: int | None = None,
    inner_batch: int | None = None,
    dense: str | None = None,
    chunk_minutes: float = planning.DEFAULT_CHUNK_MINUTES,
    shard: str | tuple[int, int] | None = None,
    max_runs: int = MAX_RUNS,
) -> Plan:
    """What ``run`` with these arguments would train (nothing trains). Finished runs count as done
    only where run would accept them."""
    sw, out, (shard, _), layout = _prepare(sweep, out, chunk_size, inner_batch, dense, chunk_minutes, shard, max_runs)
    warnings = planning.check_sizes(sw, layout)
    manifest, done, note = files.read_manifest(out), set(), ""
    if manifest is not None:
        try:
            hint = "run would refuse them; with --overwrite it would train every run"
            results.check_same_numbers(manifest, out, sw.name, layout.identity, hint)
            done = results.finished_run_ids(out, sw, layout.identity)
        except results.ResultsExist as e:
            note = str(e)
    return Plan(sw, out, layout, planning.plan(sw, layout, shard, done), done, note, warnings)
