"""The architecture's promises: no import-time side effects, nothing on the training path loads
plotting, and the result schema is written once (tables, sizes and docs follow the records)."""

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import calibjax
from calibjax import metrics, tables, train

from conftest import SMALL, example

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(f"calibjax.{m.name}" for m in pkgutil.iter_modules(calibjax.__path__) if m.name != "__main__")
PLOTTING = {"calibjax.plots", "calibjax.cli"}  # the modules allowed to load matplotlib (cli only on demand)


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_training_path_never_loads_matplotlib():
    training = [m for m in MODULES if m not in PLOTTING]
    assert {"calibjax.engine", "calibjax.results", "calibjax.planning", "calibjax.train"} <= set(training)
    r = python(
        f"import sys\nfor m in {training!r}: __import__(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    # ... and neither does the command line until it draws.
    r = python("import sys\nfrom calibjax import cli\ncli.build_parser()\nprint('matplotlib' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_importing_calibjax_changes_no_environment_jax_config_or_matplotlib_backend():
    r = python(f"""
import os, jax, matplotlib
env, config, backend = dict(os.environ), dict(jax.config.values), matplotlib.rcParams._get("backend")
for m in {MODULES!r}:
    __import__(m)
changed = sorted(k for k in set(config) | set(jax.config.values) if config.get(k) != jax.config.values.get(k))
assert dict(os.environ) == env, "environment changed"
assert not changed, changed
assert matplotlib.rcParams._get("backend") == backend, "backend changed"
import sys
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
print("ok", len(jax.config.values))
""")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


def test_setup_after_jax_started_warns_with_the_device_count_in_use():
    r = python("""
import warnings, jax
jax.numpy.zeros(1).block_until_ready()          # backends now exist with JAX's default (1 CPU device)
import calibjax
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    rt = calibjax.setup(cpu_devices=3, cache_dir="off")
print(rt.cpu_devices, len(jax.devices()), str(w[0].message))
""")
    assert r.returncode == 0, r.stderr
    n, devices, message = r.stdout.strip().split(" ", 2)
    assert n == devices == "1" and "already initialised with 1 CPU device(s)" in message and "not 3" in message


@pytest.mark.slow
def test_tables_take_their_columns_from_the_records():
    dyns = [train.make_dynamic(example(1), n_data=500, seed=s) for s in range(2)]
    out = jax.tree.map(np.asarray, train.batched_train_fn(SMALL, 2)(train.stack_dynamic(dyns)))
    t = tables.chunk_tables(SMALL, [3, 4], out)
    assert list(t["metrics"].columns) == ["run_id", "step", *metrics.Scalars._fields]
    assert list(t["density"].columns) == [
        "run_id",
        "step",
        "log10_density_lo",
        "log10_density_hi",
        *metrics.DensityBins._fields,
    ]
    assert list(t["calibration"].columns)[4:] == list(metrics.ReliabilityBins._fields)
    c = len(SMALL.checkpoints)
    assert len(t["metrics"]) == 2 * c and len(t["density"]) == 2 * c * SMALL.eval.num_bins
    assert len(t["curves"]) == 2 * c * SMALL.curve_points * 2
    # values land on the right rows: run 4's kl at the last checkpoint
    row = t["metrics"].set_index(["run_id", "step"]).loc[(4, SMALL.steps)]
    assert row["kl"] == float(out.checkpoints.scalars.kl[1, -1])
    assert {name: n for name, (n, _) in tables.row_counts(SMALL).items()} == {
        name: len(df) // 2 for name, df in t.items()
    }
    # the memory model's device bytes are the real result's
    assert tables.output_bytes(SMALL) == sum(a[0].nbytes for a in jax.tree.leaves(out))


def test_readme_lists_every_column_of_every_table():
    readme = (ROOT / "README.md").read_text()
    for spec in tables.TABLES.values():
        if spec.name == "status":  # joined into runs.parquet
            row = next(line for line in readme.splitlines() if line.startswith("| `runs.parquet`"))
        else:
            row = next(line for line in readme.splitlines() if line.startswith(f"| `{spec.name}.parquet`"))
        words = set(re.findall(r"[A-Za-z_0-9]+", row))
        assert set(spec.keys + spec.values) <= words, (spec.name, set(spec.keys + spec.values) - words)


def test_the_package_version_is_the_projects():
    import tomllib

    import calibjax

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert calibjax.__version__ == project["version"]
