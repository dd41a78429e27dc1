"""Integrity: every chunk verified before it is joined, final tables read as one set, damaged files
named in one line.

The corruption matrix: each case damages a copy of a finished sweep's directory (curves on, runs of
1000 steps, four chunks), runs one command in a real subprocess and must end either in tables equal
to the clean run's (``DataFrame.equals``) or in one line naming the damaged file, with nothing
joined; never a traceback or an abort. The growth interrupted at every write of finalizing (a kill,
or a full disk) is simulated in process, write by write.
"""

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from calibjax import sweep as sweep_mod
from calibjax.analysis import summaries
from calibjax.execution import planning, synthetic
from calibjax.storage import files, reader, results

from conftest import cli as calibjax
from conftest import sweep_text

SWEEP = dict(
    seeds=4,
    train={"steps": 1000, "checkpoints": [100, 1000], "n_data": 500},
    eval={"curves": True, "curve_points": 5},
    cases={"a": {}, "b": {"mu2": 1.0, "sigma1": 2.0}},
)
TABLES = (
    "runs",
    "metrics",
    "density",
    "calibration",
    "curves",
    "summary",
    "summary_by_setting",
    "density_times",
    "density_law",
)
RUN = ("--quiet", "--chunk-size", "2", "--no-figures")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The sweep trained cleanly (the reference), with --dense xla, and another sweep (other lr):
    trained once for the whole test session, whichever pytest-xdist worker comes first (the others
    wait on the lock, then read the same directories; no test writes into them)."""
    base = tmp_path_factory.getbasetemp().parent / "integrity"  # (shared by the workers of one session)
    base.mkdir(exist_ok=True)
    sweep, other = base / "tiny.toml", base / "other.toml"
    dirs = {"sweep": sweep, "clean": base / "clean", "xla": base / "xla", "other": base / "other"}
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "done").exists():
            sweep.write_text(sweep_text(**SWEEP))
            other.write_text(sweep_text(**{**SWEEP, "train": {**SWEEP["train"], "lr": 0.002}}))
            for out, file, extra in (
                (dirs["clean"], sweep, ()),
                (dirs["xla"], sweep, ("--dense", "xla")),
                (dirs["other"], other, ()),
            ):
                r = calibjax("run", file, "--out", out, *RUN, *extra)
                assert r.returncode == 0, r.stderr
            (base / "done").touch()
    return dirs


def chunk_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("chunks/g*") if p.is_dir())


def rewrite_table(path: Path, change) -> None:
    df = pd.read_parquet(path)
    change(df).to_parquet(path, index=False)


def edit_json(path: Path, change) -> None:
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def copy_chunk_table(source: Path, name: str):
    """Damage: chunk 0's table replaced by the same table of ``source``'s chunk 0."""
    return lambda out, made: shutil.copy(chunk_dirs(made[source])[0] / name, chunk_dirs(out)[0] / name)


def truncate(path_of, keep=0.5):
    def damage(out, made):
        p = path_of(out)
        p.write_bytes(p.read_bytes()[: int(len(p.read_bytes()) * keep)])

    return damage


def first_chunk(name):
    return lambda out: chunk_dirs(out)[0] / name


def final(name):
    return lambda out: out / name


def replace_chunk_with_others(out, made):
    mine = chunk_dirs(out)[0]
    shutil.rmtree(mine)
    shutil.copytree(chunk_dirs(made["other"])[0], mine)


def orphan_xla_part(out, made):
    """A shard part killed before its manifest was written, whose chunks another product path
    computed (the case where merge once said "every run present" over mixed numbers)."""
    part = out / "shards" / "1-of-2" / "chunks"
    part.mkdir(parents=True)
    for mine, theirs in list(zip(chunk_dirs(out), chunk_dirs(made["xla"]), strict=True))[2:]:
        shutil.rmtree(mine)
        shutil.copytree(theirs, part / theirs.name)


def older_generation(name):
    """Damage: a final table left by an earlier write of the final tables (one chunk fewer joined),
    as an interrupted finalize or summarize leaves it."""

    def damage(out, made):
        first = chunk_dirs(out)[0]
        aside = first.parent / ".held"
        first.rename(aside)
        calibjax("merge", out, "--no-figures")  # (runs missing: exit 1)
        old = (out / name).read_bytes()
        aside.rename(first)
        assert calibjax("merge", out, "--no-figures").returncode == 0
        (out / name).write_bytes(old)

    return damage


def copy_foreign_chunk(out, made):
    theirs = chunk_dirs(made["other"])[0]
    shutil.copytree(theirs, out / "chunks" / theirs.name)


# name: (damage, command, expected): "equal" (exit 0, tables equal the clean run's, the line in the
# output) or "error" (exit 2, one line naming it, the final tables untouched)
RETRAINED = "moved aside to .broken-"
MATRIX = {
    "chunk table of --dense xla": (copy_chunk_table("xla", "metrics.parquet"), "run", ("equal", RETRAINED)),
    "chunk table of another sweep": (copy_chunk_table("other", "metrics.parquet"), "run", ("equal", "SHA-256 differs")),
    "chunk table rows removed": (
        lambda out, m: rewrite_table(first_chunk("metrics.parquet")(out), lambda df: df.iloc[:-1]),
        "run",
        ("equal", "metrics.parquet is not the table written there"),
    ),
    "chunk table emptied": (
        lambda out, m: rewrite_table(first_chunk("density.parquet")(out), lambda df: df.iloc[:0]),
        "run",
        ("equal", RETRAINED),
    ),
    "chunk table zero bytes": (truncate(first_chunk("status.parquet"), 0), "run", ("equal", RETRAINED)),
    "chunk table truncated": (truncate(first_chunk("curves.parquet")), "run", ("equal", RETRAINED)),
    "chunk table deleted": (
        lambda out, m: first_chunk("calibration.parquet")(out).unlink(),
        "run",
        ("equal", "calibration.parquet is missing"),
    ),
    "chunk.json run_ids shifted": (
        lambda out, m: edit_json(
            first_chunk("chunk.json")(out), lambda i: i.update(run_ids=[r + 1 for r in i["run_ids"]])
        ),
        "run",
        ("equal", "digest does not match"),
    ),
    "chunk.json run_ids swapped": (
        lambda out, m: edit_json(first_chunk("chunk.json")(out), lambda i: i["run_ids"].reverse()),
        "run",
        ("equal", RETRAINED),
    ),
    "chunk.json run identities edited": (
        lambda out, m: edit_json(
            first_chunk("chunk.json")(out), lambda i: i.update(run_hashes=["0" * 32] * len(i["run_hashes"]))
        ),
        "run",
        ("equal", RETRAINED),
    ),
    "chunk.json deleted": (lambda out, m: first_chunk("chunk.json")(out).unlink(), "run", ("equal", RETRAINED)),
    "chunk.json not JSON": (
        lambda out, m: first_chunk("chunk.json")(out).write_text("{not json"),
        "run",
        ("equal", "no readable chunk.json"),
    ),
    "chunk replaced by another sweep's": (
        replace_chunk_with_others,
        "run",
        ("equal", "holds other runs than its name"),
    ),
    "another sweep's chunk beside them": (copy_foreign_chunk, "run", ("equal", "")),
    "orphan part of other numbers, run": (orphan_xla_part, "run", ("equal", "computed with other numbers")),
    "orphan part of other numbers, merge": (
        orphan_xla_part,
        "merge",
        ("error", r"shards/1-of-2/chunks/g\S+: computed with other numbers \(dense 'xla'"),
    ),
    "chunk damaged, merge": (
        truncate(first_chunk("metrics.parquet")),
        "merge",
        ("error", r"chunks/g\S+: metrics.parquet is not the table written there.*rerun the calibjax run"),
    ),
    "chunk damaged, status": (
        truncate(first_chunk("metrics.parquet")),
        "status",
        ("shown", r"6 of 8 runs done.*chunks not counted.*chunks/g\S+: metrics.parquet is not the table"),
    ),
    "final metrics truncated, summarize": (
        truncate(final("metrics.parquet")),
        "summarize",
        ("error", r"metrics.parquet: cannot read"),
    ),
    "final metrics truncated, status": (
        truncate(final("metrics.parquet")),
        "status",
        ("shown", r"8 of 8 runs done.*final tables not readable as one set.*metrics.parquet: cannot read"),
    ),
    "final metrics truncated, run": (truncate(final("metrics.parquet")), "run", ("equal", "")),
    "final runs zero bytes, plot": (
        truncate(final("runs.parquet"), 0),
        "plot",
        ("error", r"runs.parquet: cannot read"),
    ),
    "final summary truncated, report": (
        truncate(final("summary_by_setting.parquet")),
        "report",
        ("error", r"summary_by_setting.parquet: cannot read"),
    ),
    "final metrics of an earlier write, summarize": (
        older_generation("metrics.parquet"),
        "summarize",
        ("error", r"metrics.parquet: left by another write of the final tables.*calibjax merge"),
    ),
    "final summary of an earlier write, report": (
        older_generation("summary_by_setting.parquet"),
        "report",
        ("error", r"summary_by_setting.parquet: left by another write.*calibjax summarize"),
    ),
    "final density of an earlier write, merge": (older_generation("density.parquet"), "merge", ("equal", "")),
    "manifest not JSON, status": (
        lambda out, m: (out / "manifest.json").write_text("{"),
        "status",
        ("error", r"manifest.json: not a readable calibjax manifest"),
    ),
}


def command(name: str, sweep: Path, out: Path) -> list:
    return {
        "run": ["run", sweep, "--out", out, *RUN],
        "merge": ["merge", out, "--no-figures"],
        "status": ["status", out],
        "summarize": ["summarize", out],
        "report": ["report", out],
        "plot": ["plot", out],
    }[name]


def final_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.glob("*.parquet")}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MATRIX))
def test_corruption_matrix(made, tmp_path, case):
    damage, cmd, (expected, pattern) = MATRIX[case]
    out = tmp_path / "res"
    shutil.copytree(made["clean"], out)
    damage(out, made)
    before = final_bytes(out)
    r = calibjax(*command(cmd, made["sweep"], out))
    said = r.stdout + r.stderr
    assert "Traceback" not in said and r.returncode in (0, 2), said
    if expected == "equal":
        assert r.returncode == 0 and pattern in said, said
        for name in TABLES:
            a, b = pd.read_parquet(out / f"{name}.parquet"), pd.read_parquet(made["clean"] / f"{name}.parquet")
            assert a.equals(b), name
        if case == "chunk table of --dense xla":  # a second run finds nothing to redo
            again = calibjax(*command(cmd, made["sweep"], out))
            assert again.returncode == 0 and "already complete" in again.stdout and RETRAINED not in again.stdout
    elif expected == "error":
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("calibjax: error: "), said
        assert re.search(pattern, lines[0]), lines[0]
        assert final_bytes(out) == before  # nothing joined, nothing rewritten
    else:  # shown by status
        assert r.returncode == 0 and re.search(pattern, r.stdout, flags=re.S), r.stdout


# ---------------------------------------------------------------- finalizing interrupted, write by write


def grown_directory(tmp_path) -> tuple[Path, sweep_mod.Sweep, planning.Layout]:
    """A finished 2-seed sweep (synthetic results), then the same sweep grown to 3 seeds with the new
    chunks written: what finalizing the growth starts from."""
    layout = planning.default_layout(chunk_size=2)
    out = tmp_path / "res"
    small = sweep_mod.parse(tomllib.loads(sweep_text(**{**SWEEP, "seeds": 2})), "tiny.toml", "v1")
    synthetic.new_results(small, out, layout)
    synthetic.write_chunks(small, out, layout)
    results.finalize(out, sweep_mod.runs_table(small), layout.identity)
    summaries.write_summaries(out)
    grown = sweep_mod.parse(tomllib.loads(sweep_text(**{**SWEEP, "seeds": 3})), "tiny.toml", "v2")
    synthetic.write_chunks(grown, out, layout)
    return out, grown, layout


def finish_growth(out, grown, layout) -> None:
    results.finalize(out, sweep_mod.runs_table(grown), layout.identity)
    summaries.write_summaries(out)


def test_the_same_chunks_joined_again_are_the_same_set(tmp_path):
    """Processes that finish together each join the chunks (three on one directory): joining the
    same chunks again, here or in a copy of the directory, writes the same bytes under the same
    generation, so a reader between two such writes reads one set; other content, another generation."""
    out, grown, layout = grown_directory(tmp_path)
    before = reader.generation(out)
    finish_growth(out, grown, layout)
    first, generation = final_bytes(out), reader.generation(out)
    assert generation != before and len(first) == len(TABLES)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for again in (out, copy):
        finish_growth(again, grown, layout)
        assert reader.generation(again) == generation and final_bytes(again) == first


def readable_set(out: Path) -> dict | None:
    """The final tables if every one reads as part of one set (else None: refused in one line)."""
    try:
        return {name: reader.read_table(out, name) for name in TABLES}
    except files.CorruptResults as e:
        assert "\n" not in str(e) and "left by another write" in str(e), e
        return None


class Fault(BaseException):
    """What a kill does to the writer at that moment: nothing after it runs (not an Exception, so no
    handler of calibjax's catches it)."""


def interrupted_at(k: int, fault: str, monkeypatch):
    """From now on, the k-th file write fails: "kill" stops the writer right after its k-th rename
    into place; "full disk" fails its k-th temporary file with ENOSPC. Returns the write counter."""
    count = {"n": 0}
    real_replace, real_mkstemp = os.replace, tempfile.mkstemp

    def replace(src, dst):
        real_replace(src, dst)
        count["n"] += 1
        if count["n"] == k:
            raise Fault

    def mkstemp(*args, **kw):
        count["n"] += 1
        if count["n"] == k:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*args, **kw)

    if fault == "kill":
        monkeypatch.setattr(os, "replace", replace)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return count


@pytest.mark.parametrize("fault", ["kill", "full disk"])
def test_growth_interrupted_at_every_write_leaves_one_set_or_a_refusal(tmp_path, monkeypatch, fault):
    """Growing a finished sweep (2 -> 3 seeds), finalizing and summarizing are interrupted at their
    k-th file write, for every k: a kill (right after the write) or a full disk (the write fails).
    Readers then see the whole previous set, the whole new one, or refuse each table of a mixed set
    in one line (a full disk always leaves the previous set); the next finalize repairs it."""
    start, grown, layout = grown_directory(tmp_path / "start")
    old = readable_set(start)
    clean = tmp_path / "clean"
    shutil.copytree(start, clean)
    with monkeypatch.context() as m:
        count = interrupted_at(0, fault, m)
        finish_growth(clean, grown, layout)
    new = readable_set(clean)
    assert len(new["runs"]) == len(old["runs"]) + 2 and count["n"] >= 8  # 5 tables, manifest, 2 summaries
    outcomes = []
    for k in range(1, count["n"] + 1):
        trial = tmp_path / f"k{k}"
        shutil.copytree(start, trial)
        with monkeypatch.context() as m:
            interrupted_at(k, fault, m)
            with pytest.raises((Fault, OSError)):
                finish_growth(trial, grown, layout)
        seen = readable_set(trial)
        if seen is None:
            outcomes.append("refused")
        else:
            ref = old if len(seen["runs"]) == len(old["runs"]) else new
            outcomes.append("old" if ref is old else "new")
            for name in TABLES:
                assert seen[name].equals(ref[name]), (k, name)
        finish_growth(trial, grown, layout)  # the next run, merge or summarize repairs it
        repaired = readable_set(trial)
        assert repaired is not None and all(repaired[n].equals(new[n]) for n in TABLES), k
    # A kill right after a table's rename leaves a mixed set (refused) until the last write; a full
    # disk while the tables are written leaves the previous set whole (the tables are switched into
    # place only once all are written).
    tables_written = 5
    if fault == "kill":
        assert outcomes == ["refused"] * (len(outcomes) - 1) + ["new"], outcomes
    else:
        assert outcomes[:tables_written] == ["old"] * tables_written and "new" not in outcomes, outcomes
