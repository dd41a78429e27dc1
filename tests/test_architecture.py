"""The architecture's promises: layers that import only the layers below them, no import-time side
effects, nothing on the training path loads plotting, one error base, short host-side functions,
and the result schema written once (tables, sizes and docs follow the records)."""

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import calibjax
from calibjax.core import metrics, train
from calibjax.storage import tables

from conftest import SMALL, example

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "calibjax"
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(calibjax.__path__, "calibjax.") if not m.name.endswith("__main__")
)
PLOTTING = {"calibjax.analysis.plots", "calibjax.analysis.figures"}  # the modules that load matplotlib

# The layers, lowest first: a module may import its own layer and those below it, never above.
LAYERS = [
    ("errors", {"calibjax.errors"}),
    ("core", {"calibjax.core"}),
    ("sweep", {"calibjax.sweep"}),
    ("storage", {"calibjax.storage"}),
    ("execution", {"calibjax.execution"}),
    ("analysis", {"calibjax.analysis"}),
    ("cluster", {"calibjax.cluster"}),
    ("pipeline", {"calibjax.pipeline"}),
    ("cli", {"calibjax.cli", "calibjax.__main__"}),
]


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    if module == "calibjax":
        return -1  # the package itself: __version__, CalibjaxError and lazy names only
    raise AssertionError(f"{module} is in no layer")


def imports_of(path: Path) -> set[str]:
    """Every calibjax module a file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("calibjax"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("calibjax"))
    return {m for m in found if m != "calibjax"}


def module_path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    package = PACKAGE / rel / "__init__.py"
    return package if package.exists() else (PACKAGE / rel).with_suffix(".py")


def test_every_module_has_a_layer_and_imports_only_its_own_and_lower_layers():
    wrong = []
    for name in MODULES:
        mine = layer_of(name)
        for imported in imports_of(module_path(name)):
            if layer_of(imported) > mine:
                wrong.append(f"{name} ({LAYERS[mine][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})")
    assert not wrong, "\n".join(wrong)
    # the boundaries the README names, checked on the graph itself
    core = [n for n in MODULES if n.startswith("calibjax.core")]
    assert core and all(layer_of(i) <= 1 for n in core for i in imports_of(module_path(n)))
    storage = [n for n in MODULES if n.startswith("calibjax.storage")]
    assert not any(i.startswith("calibjax.analysis") for n in storage for i in imports_of(module_path(n)))
    assert not any("calibjax.cli" in imports_of(module_path(n)) for n in MODULES if n != "calibjax.__main__")


def test_the_layering_test_would_see_an_upward_import(tmp_path):
    """The check above reads imports inside functions too (a lazy import is still a dependency)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from calibjax.storage import files\n    import calibjax.cli\n")
    assert imports_of(f) == {"calibjax.storage", "calibjax.storage.files", "calibjax.cli"}
    assert layer_of("calibjax.storage.files") > layer_of("calibjax.core.train")


def test_the_core_reads_and_writes_no_file():
    io = re.compile(r"\b(open|read_text|write_text|read_bytes|write_bytes|mkdir|subprocess|os\.environ)\b")
    for path in sorted((PACKAGE / "core").glob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        code = re.sub(r'"""[\s\S]*?"""', "", code)
        assert not io.search(code), f"{path.name}: {io.search(code).group()}"


def test_every_user_facing_error_has_the_one_base():
    from calibjax import cli, cluster, pipeline
    from calibjax.analysis import plots
    from calibjax.execution import kernel_loader, runtime
    from calibjax.storage import arrays, files, results
    from calibjax.sweep import SweepError

    errors = [
        SweepError,
        runtime.SetupError,
        kernel_loader.KernelError,
        results.ResultsExist,
        files.CorruptResults,
        cluster.ClusterError,
        plots.PlotError,
        arrays.ExportError,
        cli.UsageError,
        pipeline.NothingFinished,
    ]
    assert all(issubclass(e, calibjax.CalibjaxError) and issubclass(e, ValueError) for e in errors)
    # ... and no other exception class is defined outside the core
    defined = set()
    for name in MODULES:
        for node in ast.walk(ast.parse(module_path(name).read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases
            ):
                defined.add(node.name)
    assert defined == {e.__name__ for e in errors} | {"CalibjaxError", "Invalid"}, defined


def test_host_side_functions_are_short():
    """Outside the numerical core no function is over ~50 lines (ruff's C901 bounds complexity at 12)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        if "core" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 55:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long


def test_no_module_is_over_600_lines():
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_the_training_path_never_loads_matplotlib():
    training = [m for m in MODULES if m not in PLOTTING]
    assert {"calibjax.execution.engine", "calibjax.storage.results", "calibjax.core.train"} <= set(training)
    r = python(
        f"import sys\nfor m in {training!r}: __import__(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    # ... and neither does the command line until it draws.
    r = python("import sys\nfrom calibjax import cli\ncli.build_parser()\nprint('matplotlib' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


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


def test_import_calibjax_is_light_and_its_public_names_resolve():
    r = python(
        "import sys, calibjax\nprint(sorted(m for m in ('jax', 'pandas', 'numpy') if m in sys.modules))\n"
        "print(all(callable(getattr(calibjax, n)) for n in calibjax.__all__ if n != '__version__'))"
    )
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == ["[]", "True"], r.stdout + r.stderr


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
    doc = (ROOT / "docs" / "results.md").read_text()
    for spec in tables.TABLES.values():
        name = "runs" if spec.name == "status" else spec.name  # status is joined into runs.parquet
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}.parquet`"))
        words = set(re.findall(r"[A-Za-z_0-9]+", row))
        assert set(spec.keys + spec.values) <= words, (spec.name, set(spec.keys + spec.values) - words)


def test_pyproject_ships_every_package_and_the_kernel_source():
    """A wheel carries what pyproject lists: every folder with an __init__ (a forgotten one would be
    missing from a non-editable install) and the CPU kernel's C++ source beside its loader."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(tool["packages"]) == folders | {"calibjax.sweeps"}
    (pattern,) = tool["package-data"]["calibjax.execution"]
    from calibjax.execution import kernel_loader

    assert kernel_loader.SOURCE.exists() and kernel_loader.SOURCE.match(f"execution/{pattern}")


def test_the_package_version_is_the_projects():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert calibjax.__version__ == project["version"]
