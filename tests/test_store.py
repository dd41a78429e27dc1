"""Files on disk: writer identity, locks, unfinished and damaged chunks."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from calibjax.storage import chunks, files, owned, reader


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_debris_of_dead_local_writers_goes_and_everything_else_stays(tmp_path):
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    dead = chunks / f".tmp-{files.HOST}-{dead_pid()}-abc"
    live = chunks / f".tmp-{files.HOST}-{os.getpid()}-def"
    remote = chunks / ".tmp-otherhost-1-ghi"
    users = tmp_path / ".tmp-notes"
    for p in (dead, live, remote):
        p.mkdir()
    users.write_text("mine")
    stale_lock = chunks / f".lock-{CHUNK}"
    stale_lock.write_text(f"{files.HOST}-{dead_pid()}\n")
    files.clean_debris(tmp_path)
    assert not dead.exists() and not stale_lock.exists()
    assert live.exists() and remote.exists() and users.read_text() == "mine"


def test_a_chunk_lock_is_held_once_and_taken_over_from_a_dead_holder(tmp_path):
    a, b = chunks.ChunkLock(tmp_path, CHUNK), chunks.ChunkLock(tmp_path, CHUNK)
    assert a.acquire() and not b.acquire() and b.held_elsewhere()
    a.release()
    assert b.acquire()
    b.release()
    a.path.write_text(f"{files.HOST}-{dead_pid()}\n")  # a holder killed with -9
    assert b.acquire()
    b.release()
    assert not a.path.exists()


CHUNK = f"g000-r0000000-n2-{chunks.content_tag(['hash0', 'hash1'])}"


IDENTITY = {"numbers_version": 5, "backend": "cpu", "vector_width": 8, "dense": "kernel", "cpu_class": "x86-64"}


def _chunk(out, run_ids=(0, 1), identity=IDENTITY, bayes_loss=0.5):
    df = pd.DataFrame({"run_id": list(run_ids), "status": "ok", "bayes_loss": bayes_loss})
    return chunks.write_chunk_tables(
        out, CHUNK, {"status": df, "metrics": df[["run_id"]]}, run_ids, [f"hash{i}" for i in run_ids], identity
    )


def _edit_info(d, **changes):
    info = json.loads((d / "chunk.json").read_text())
    (d / "chunk.json").write_text(json.dumps({**info, **changes}))


def test_a_chunk_proves_its_content_and_numbers(tmp_path):
    """chunk.json records each table's size and SHA-256, the runs and the numbers identity, under a
    digest: a table replaced by another (same run_ids, other numbers), chunk.json's run_ids edited,
    or a chunk of other numbers is not finished, and says why."""
    _chunk(tmp_path)
    d = tmp_path / "chunks" / CHUNK
    info, why = chunks.check_chunk(d, IDENTITY)
    assert why is None and info["files"]["status"]["rows"] == 2
    assert chunks.check_chunk(d, {**IDENTITY, "dense": "xla"}) == (None, "computed with other numbers (dense 'kernel')")

    other = tmp_path / "other"
    _chunk(other, bayes_loss=0.25)  # the same chunk with other numbers, say trained with --dense xla
    (d / "status.parquet").write_bytes((other / "chunks" / CHUNK / "status.parquet").read_bytes())
    rejected = []
    assert chunks.finished_hashes(tmp_path, IDENTITY, rejected) == set()
    assert rejected == [(d, "status.parquet is not the table written there (its size or SHA-256 differs)")]

    _chunk(other / "b")
    d = other / "b" / "chunks" / CHUNK
    _edit_info(d, run_ids=[1, 0])  # swapped by hand
    assert chunks.check_chunk(d)[1] == "chunk.json was changed after it was written (its digest does not match)"
    assert not chunks.chunk_complete(d)


def test_a_chunk_of_other_runs_or_numbers_is_replaced_not_kept(tmp_path):
    """A chunk directory of the same name that holds other runs (another sweep's) or other numbers is
    moved aside when the chunk is written: never taken as this chunk, never deleted."""
    _chunk(tmp_path, identity={**IDENTITY, "dense": "xla"})
    assert _chunk(tmp_path)  # written: the one there was of other numbers
    assert chunks.check_chunk(tmp_path / "chunks" / CHUNK, IDENTITY)[1] is None
    assert len(list((tmp_path / "chunks").glob(f".broken-{CHUNK}-*"))) == 1


def test_a_chunk_written_before_chunk_hashes_still_counts(tmp_path):
    """Format 1 (0.10.0 and earlier): no content recorded; its tables' presence is checked and the
    directory's manifest vouches for its numbers."""
    _chunk(tmp_path)
    d = tmp_path / "chunks" / CHUNK
    info = json.loads((d / "chunk.json").read_text())
    old = {k: info[k] for k in ("tables", "run_ids", "run_hashes", "writer")}
    (d / "chunk.json").write_text(json.dumps(old))
    assert chunks.finished_hashes(tmp_path, IDENTITY) == {"hash0", "hash1"}


def test_an_unfinished_chunk_is_not_finished_and_is_replaced_not_deleted(tmp_path):
    assert _chunk(tmp_path) and chunks.finished_hashes(tmp_path) == {"hash0", "hash1"}
    assert not _chunk(tmp_path)  # finished already (say, by another process): nothing written
    d = tmp_path / "chunks" / CHUNK
    (d / "metrics.parquet").unlink()
    assert chunks.finished_hashes(tmp_path) == set()  # a table missing: unfinished, so retrained
    assert _chunk(tmp_path) and chunks.finished_hashes(tmp_path) == {"hash0", "hash1"}
    broken = list((tmp_path / "chunks").glob(f".broken-{CHUNK}-*"))
    assert len(broken) == 1 and (broken[0] / "status.parquet").exists()  # moved aside, kept


def test_a_damaged_table_is_named_with_the_way_out(tmp_path):
    _chunk(tmp_path)
    (tmp_path / "chunks" / CHUNK / "status.parquet").write_bytes(b"not parquet")
    with pytest.raises(files.CorruptResults, match="status.parquet: cannot read.*move that chunk directory away"):
        chunks.read_chunk_table(tmp_path / "chunks" / CHUNK, "status")


def test_a_directory_another_process_is_starting_is_not_foreign(tmp_path):
    """Between creating the directory and renaming manifest.json into place, a starting process
    leaves only its temporary file: a second process joins; a user's look-alike file still refuses."""
    from calibjax import sweep
    from calibjax.storage import results

    from conftest import sweep_doc

    sw = sweep.parse(sweep_doc())
    out = tmp_path / "out"
    out.mkdir()
    (out / f".tmp-{files.HOST}-{os.getpid()}-manifest").write_text("{}")
    results.prepare_output(sw, out, {}, overwrite=False)
    (out / ".tmp-notes").write_text("mine")
    with pytest.raises(results.ResultsExist, match="not a calibjax results directory"):
        results.prepare_output(sw, out, {}, overwrite=False)


def test_a_manifest_renamed_into_place_between_two_looks_is_seen(tmp_path, monkeypatch):
    """The other process renames its manifest after this one found none but before it lists the
    directory: the directory is the other process's, not foreign."""
    from calibjax import sweep
    from calibjax.storage import results

    from conftest import sweep_doc

    sw = sweep.parse(sweep_doc())
    out = tmp_path / "out"
    out.mkdir()
    identity = results.numbers_identity("cpu", 8, "xla", "x86-64-fma")
    files.write_json(out / "manifest.json", {**results.sweep_manifest(sw), **identity})
    real, looks = files.read_manifest, []

    def read_manifest(d):  # the first look comes just before the rename
        looks.append(d)
        return None if len(looks) == 1 else real(d)

    monkeypatch.setattr(files, "read_manifest", read_manifest)
    results.prepare_output(sw, out, identity, overwrite=False)
    assert len(looks) == 2


def test_load_results_reads_only_calibjax_tables_never_a_writers_temporary_file(tmp_path):
    """Three processes sharing a directory: one read the final tables while another's temporary
    parquet file (empty, being written) lay beside them, and failed with a traceback. Only
    calibjax's table names are read; a damaged table is a CorruptResults naming it."""
    files.write_parquet(tmp_path / "metrics.parquet", pd.DataFrame({"run_id": [0], "step": [10], "kl": [0.1]}))
    files.write_parquet(tmp_path / "runs.parquet", pd.DataFrame({"run_id": [0]}))
    (tmp_path / ".tmp-otherhost-12345-abcd.parquet").write_bytes(b"")  # another writer, mid-write
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "mine.parquet")  # the user's own file
    t = reader.load_results(tmp_path)
    assert set(t) == {"metrics", "runs"} and t["metrics"]["kl"].tolist() == [0.1]
    (tmp_path / "metrics.parquet").write_bytes(b"PAR1 damaged")
    with pytest.raises(files.CorruptResults, match="metrics.parquet: cannot read"):
        reader.load_results(tmp_path)


def test_a_damaged_final_table_is_an_error_not_a_missing_table(tmp_path):
    pd.DataFrame({"run_id": [0]}).to_parquet(tmp_path / "runs.parquet")
    (tmp_path / "metrics.parquet").write_bytes(b"not parquet")
    t = reader.Results(tmp_path)
    assert "metrics" in t and "density" not in t and len(t["runs"]) == 1
    with pytest.raises(files.CorruptResults, match="metrics.parquet: cannot read"):
        t["metrics"]
    with pytest.raises(KeyError):
        t["bogus"]


@pytest.mark.slow
def test_a_process_that_read_a_table_exits_cleanly(tmp_path):
    """Reading a parquet table through a Python file object let pyarrow's I/O threads abort the
    interpreter at exit ("terminate called without an active exception") in about half of the
    runs: calibjax summarize/plot then exited 134 after printing its answer. Eight processes in a
    row must all exit 0."""
    wide = {"run_id": range(100), "case": ["a", "b"] * 50, **{f"x{i}": np.linspace(0, i, 100) for i in range(60)}}
    pd.DataFrame(wide).to_parquet(tmp_path / "runs.parquet")
    code = f"from calibjax.storage import reader\nreader.read_table({str(tmp_path)!r}, 'runs')"
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True).returncode for _ in range(8)]
    assert codes == [0] * 8


def test_overwrite_removes_exactly_what_calibjax_recorded_and_follows_no_symlink(tmp_path):
    """remove_results (what --overwrite does) deletes calibjax's own files only: not a user's PNG
    beside the figures, nothing behind a symlinked figures folder or chunk, not a user's folder
    named like a chunk; and a chunk-named symlink does not stop it half-way."""
    out, outside = tmp_path / "res", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    assert _chunk(out)  # calibjax's chunk
    shard = out / "shards" / "0-of-2"
    assert _chunk(shard)
    files.write_json(out / "manifest.json", {"sweep_sha256": "x"})
    files.write_json(shard / "manifest.json", {"sweep_sha256": "x"})
    pd.DataFrame({"run_id": [0]}).to_parquet(out / "runs.parquet")
    (out / "report.html").write_text("<html>")
    figures = out / "figures"
    figures.mkdir()
    (figures / "kl_vs_steps.png").write_bytes(b"png")
    owned.record_figures(out, [figures / "kl_vs_steps.png", tmp_path / "not_here.png"], None)
    theirs = [figures / "my_plot.png", outside / "kl_vs_steps.png", outside / "chunk.json"]
    user_chunk = shard / "chunks" / "g001-r0000002-n2-0123abcd"  # named like a chunk, the user's
    user_chunk.mkdir()
    (user_chunk / "metrics.parquet").write_bytes(b"mine")
    theirs.append(user_chunk / "metrics.parquet")
    for p in theirs[:3]:
        p.write_bytes(b"mine")
    (out / "chunks" / "g002-r0000004-n2-0123abcd").symlink_to(outside, target_is_directory=True)
    (out / "summary.parquet").symlink_to(outside / "chunk.json")  # a table name, but a link
    owned.remove_results(out)
    assert all(p.read_bytes() == b"mine" for p in theirs)
    assert not (out / "runs.parquet").exists() and not (out / "report.html").exists()
    assert not (out / "manifest.json").exists() and not (shard / "manifest.json").exists()
    assert not (out / "chunks" / CHUNK).exists() and not (shard / "chunks" / CHUNK).exists()
    assert sorted(p.name for p in figures.iterdir()) == ["my_plot.png"]
    assert (out / "chunks" / "g002-r0000004-n2-0123abcd").is_symlink() and (out / "summary.parquet").is_symlink()

    # a symlinked figures folder: nothing behind it is touched, whatever its record says
    (out / "figures").rename(tmp_path / "old_figures")
    (out / "figures").symlink_to(outside, target_is_directory=True)
    files.write_json(outside / owned.FIGURE_RECORD, ["kl_vs_steps.png"])
    owned.remove_results(out)
    assert (outside / "kl_vs_steps.png").read_bytes() == b"mine" and (outside / owned.FIGURE_RECORD).exists()
