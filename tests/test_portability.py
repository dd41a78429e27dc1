"""A run's numbers on CPUs of two generations: a sweep (curves, the split of kl, a mixture class,
uneven priors, a logspace grid; 1000 steps) trained here, and its shards trained one here and one on
another CPU, merged and summarised again there: every table compared with DataFrame.equals.

The other CPU is an Intel Haswell (AVX2 and FMA, no AVX-512) emulated by Debian's qemu-user
(``make test-isa``, with --qemu), which every library in the process takes for the CPU. Capping this
CPU's instruction set instead (XLA's --xla_cpu_max_isa, numpy's NPY_DISABLE_CPU_FEATURES) is not the
same: XLA still compiles for this CPU model, and libraries that find the CPU themselves (YNNPACK)
ignore the cap. The emulated Haswell is what showed YNNPACK's sums and XLA's dots differing between
the two generations (calibjax now avoids both); the cap is used for what it does model: numpy's
dispatch (test_portable.py) and the CPU kernel's variants (test_cpu_kernel.py).
"""

import json
from pathlib import Path

import pandas as pd
import pytest

from calibjax.execution import kernel_loader, runtime
from calibjax.storage import files, results

from conftest import cli, sweep_doc, to_toml

# Without the estimator benchmark and temperature scaling, whose programs take the emulated CPU
# minutes more to compile (the same sweep with both, by hand, gave equal tables too: README).
SWEEP = sweep_doc(
    name="isa",
    seeds=4,
    task={
        "priors": [0.3, 0.7],
        "means": [0.0, [[2.5], [5.0]]],
        "sigmas": [1.0, [[1.0], [0.7]]],
        "weights": [1.0, [0.35, 0.65]],
    },
    model={"hidden": [16, 16]},
    train={"steps": 1000, "checkpoints": [10, 300, 1000], "batch_size": 32, "n_data": 1000},
    eval={"curves": True, "curve_points": 41, "points": 1024, "kl_split": True},
    grid={"lr": {"logspace": [1e-3, 1e-2], "num": 3}},
)
HASWELL = "Haswell-noTSX"  # AVX2, FMA; no AVX-512


def tables(out: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}


def assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    assert ta.keys() == tb.keys() and len(ta["runs"]) == 12
    assert {"runs", "metrics", "density", "calibration", "curves", "summary", "summary_by_setting"} <= ta.keys()
    different = [name for name in ta if not ta[name].equals(tb[name])]
    assert not different, different


def ok(r) -> None:
    assert r.returncode == 0, r.stdout + r.stderr


def test_results_of_another_cpu_class_are_refused_in_one_line(tmp_path):
    """Another architecture, or x86 without FMA, or a directory trained with XLA's dot on another
    CPU model: refused before anything trains."""
    sweep = tmp_path / "tiny.toml"
    sweep.write_text(to_toml(sweep_doc()))
    ok(cli("run", sweep, "--out", tmp_path / "out", "--no-figures", "--quiet"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["cpu_class"] == runtime.cpu_class(manifest["dense"]) and manifest["cpu"]["isa"] == runtime.cpu_isa()
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({**manifest, "cpu_class": "aarch64"}))
    r = cli("run", sweep, "--out", tmp_path / "out", "--no-figures", "--quiet")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert f"on CPUs of class 'aarch64', not {manifest['cpu_class']!r}" in line and "--constraint" in line, r.stderr


@pytest.mark.qemu
def test_shards_trained_on_an_emulated_haswell_and_on_this_cpu_merge_into_this_ones_tables(tmp_path):
    """The sweep trained here, and again with shard 0 of 2 on the Haswell, shard 1 here, merged here
    and summarised on the Haswell. (One static group: each more is minutes of emulated compiling;
    the kernel's other shapes are compared across its instruction sets in test_cpu_kernel.py.)"""
    sweep = tmp_path / "isa.toml"
    sweep.write_text(to_toml(SWEEP))
    native, mixed = tmp_path / "native", tmp_path / "mixed"
    ok(cli("run", sweep, "--out", native, "--no-figures", "--quiet"))
    ok(cli("run", sweep, "--out", mixed, "--no-figures", "--quiet", "--shard", "0/2", cpu=HASWELL, timeout=1800))
    ok(cli("run", sweep, "--out", mixed, "--no-figures", "--quiet", "--shard", "1/2"))
    ok(cli("merge", mixed, "--no-figures"))
    assert_same_tables(native, mixed)
    ok(cli("summarize", mixed, cpu=HASWELL, timeout=1800))  # numpy's code for the Haswell
    assert_same_tables(native, mixed)
    haswell = files.read_manifest(mixed / "shards" / "0-of-2")
    assert haswell["cpu"]["isa"] == "avx2" and haswell["dense"] == ("kernel" if kernel_loader.available() else "xla")
    assert haswell["cpu_class"] == files.read_manifest(native)["cpu_class"] == "x86-64-fma"


def test_the_identity_check_names_the_cpu_class(tmp_path):
    identity = results.numbers_identity("cpu", 8, "kernel", "x86-64-fma")
    manifest = {"sweep_name": "isa", **identity}
    results.check_same_numbers(manifest, tmp_path, "isa", identity, "hint")  # the same class joins
    for other in ("aarch64", "GenuineIntel-6-143-avx512"):
        with pytest.raises(results.ResultsExist, match=f"on CPUs of class {other!r}, not 'x86-64-fma'"):
            results.check_same_numbers({**manifest, "cpu_class": other}, tmp_path, "isa", identity, "hint")


def test_the_cpu_class_follows_the_product_path_the_instruction_set_and_xlas_libraries(monkeypatch):
    assert runtime.portable_xla()  # conftest called setup() before JAX started
    isa = runtime.cpu_isa()
    assert runtime.cpu_class("kernel") == ("x86-64-fma" if isa in ("avx2", "avx512") else isa)
    assert runtime.cpu_class("xla") == runtime.cpu_signature() and runtime.cpu_signature().endswith(isa)
    monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_max_isa=SSE4_2 {runtime.PORTABLE_XLA_FLAG}")  # no FMA: its own class
    assert runtime.xla_max_isa() == "sse4.2" and runtime.cpu_class("kernel") in ("sse4.2", "aarch64", "arm64")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=reduce")  # YNNPACK on: this CPU only
    assert runtime.cpu_class("kernel") == runtime.cpu_signature()
