"""Sweep files: expansion, grids, grouping, and every kind of bad input."""

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest

from calibjax import sweep

from conftest import sweep_doc, to_toml
from conftest import sweep_text as _text

ROOT = Path(__file__).resolve().parents[1]
BASE = _text(name="t", model=None, eval=None, train={"steps": 100, "checkpoints": [10, 100], "n_data": None})


def parse(text):
    return sweep.parse(tomllib.loads(text), "s.toml", text)


def test_cases_times_seeds_expand_in_order_with_overrides():
    sw = parse(BASE + "[cases.a]\n[cases.b]\nmu2 = 1.5\nsigmas = [2.0, 1.0]\nlr = 0.01\n")
    runs = sweep.runs_table(sw)
    assert list(runs["run_id"]) == [0, 1, 2, 3]
    assert list(runs["case"]) == ["a", "a", "b", "b"] and list(runs["seed"]) == [0, 1, 0, 1]
    b = runs[runs["case"] == "b"].iloc[0]
    assert (b["mu2"], b["sigma1"], b["lr"]) == (1.5, 2.0, 0.01)
    assert runs.loc[0, "lr"] == 1e-3 and runs.loc[0, "n_data"] == np.inf  # defaults: lr 1e-3, online


def test_grid_ranges_priors_and_one_group_for_dynamic_settings():
    sw = parse(
        BASE
        + """
[grid]
lr = {logspace = [1e-4, 1e-2], num = 3}
prior1 = [0.5, 0.9]
n_data = [100, "online"]
mu2 = {linspace = [1.0, 2.0], num = 2}
"""
    )
    runs = sweep.runs_table(sw)
    assert len(runs) == 3 * 2 * 2 * 2 * 2
    np.testing.assert_allclose(sorted(runs["lr"].unique()), [1e-4, 1e-3, 1e-2])
    np.testing.assert_allclose(runs["prior1"] + runs["prior2"], 1.0)
    assert set(runs["n_data"]) == {100.0, np.inf}
    assert runs["group"].nunique() == 1  # all dynamic: one compiled program


def test_static_settings_make_groups():
    sw = parse(
        BASE + "[grid]\nwidth = [16, 32]\ndepth = [1, 2]\nbatch_size = {range = [32, 64], step = 32, int = true}\n"
    )
    runs = sweep.runs_table(sw)
    assert runs["group"].nunique() == 8
    assert set(runs["hidden"]) == {"16", "32", "16-16", "32-32"}


def test_mixture_classes_are_padded_with_zero_weight_components():
    sw = parse(
        BASE.replace("means = [0.0, 3.0]", "means = [0.0, [[-2.0], [2.0]]]").replace(
            "sigmas = [1.0, 1.0]", "sigmas = [1.0, 0.5]\nweights = [1.0, [1.0, 3.0]]"
        )
    )
    t = sw.runs[0].task
    assert t["mean"].shape == (2, 2, 1)
    np.testing.assert_allclose(t["weight"], [[1.0, 0.0], [0.25, 0.75]])


def bad_text(task="means = [0.0, 3.0]\nsigmas = [1.0, 1.0]", train="steps = 100", extra=""):
    return f"seeds = 1\n{extra}\n[task]\n{task}\n[train]\n{train}\n"


OK_TASK = "means = [0.0, 1.0]\nsigmas = [1.0, 1.0]"
BAD = [
    (bad_text(extra="[eval]\ntrue_levels = 512"), "[eval] true_levels: removed in 0.12.0"),
    (bad_text(extra="[grid]\ntrue_levels = [256, 512]"), "true_levels: removed in 0.12.0"),
    (bad_text(train="steps = 100\nlrr = 0.1"), "[train] unknown key 'lrr'"),
    (bad_text(task="means = [0.0, 1.0]"), "sigmas: missing required setting"),
    (bad_text(train="lr = 0.1"), "steps: missing required setting"),
    (bad_text(task="means = [0.0, 1.0]\nsigmas = [1.0, 0.0]"), "sigmas: every sigma must be > 0"),
    (bad_text(task=OK_TASK + "\npriors = [-0.5, 1.5]"), "priors must be > 0"),
    (bad_text(task=OK_TASK + "\npriors = [0.5, 0.6]"), "priors must sum to 1"),
    (bad_text(task="means = [0.0, 1.0]\nsigmas = [1.0, 1.0, 2.0]"), "sigmas: 3 classes, but means has 2"),
    (bad_text(task=OK_TASK + "\npriors = [0.2, 0.3, 0.5]"), "priors: 3 values"),
    (bad_text(task="means = [[0.0, 1.0], 1.0]\nsigmas = [1.0, 1.0]"), "every class needs the same dimension"),
    (bad_text(train="steps = 100\ncheckpoints = [10, 200]"), "checkpoints: step 200 is beyond steps = 100"),
    (bad_text(train='steps = 100\nlr = "fast"'), "lr: expected a positive number, got 'fast'"),
    (bad_text(train='steps = "many"'), "steps: expected a positive integer"),
    (bad_text(task='means = [0.0, "x"]\nsigmas = [1.0, 1.0]'), "means: class 2: expected a number"),
    (bad_text() + "[grid]\nsigma2 = [1.0, -1.0]\n", "[grid] sigma2: sigma must be > 0"),
    (bad_text() + "[grid]\nlr = {logspace = [0, 1], num = 3}\n", "lr.logspace: ends must be > 0"),
    (bad_text() + "[cases.a]\nmu7 = 1.0\n", "[cases.a] mu7: no such entry"),
    (bad_text() + '[model]\nactivation = "swish2"\n', "activation: expected one of"),
    (bad_text(extra="bogus = 1"), "unknown key 'bogus' at top level"),
    (bad_text(train="steps = nan"), "steps: expected a positive integer, got nan"),
    (bad_text().replace("seeds = 1", "seeds = inf"), "seeds: expected a count >= 1"),
    (bad_text(task="means = [0.0, inf]\nsigmas = [1.0, 1.0]"), "means: class 2: expected a number"),
    (bad_text() + "[model]\nhidden = [64, nan]\n", "hidden: expected a list of positive integers"),
    # duplicate runs: a repeated grid value (also equal only once checked) and two cases alike
    (bad_text() + "[grid]\nmu2 = [1.0, 1.0, 3.0, 4.0]\n", "[grid] mu2: the value 1.0 is given twice"),
    (bad_text() + "[grid]\nbatch_size = [16, 16.0]\n", "[grid] batch_size: the value 16.0 is given twice"),
    (bad_text() + "[grid]\nhidden = [[8], [8]]\n", "[grid] hidden: the value [8] is given twice"),
    (
        bad_text() + "[grid]\nlr = [0.1, 0.1000000001]\n",
        "lr: the value 0.1000000001 is given twice (as 0.1, once checked in",
    ),
    (bad_text() + "[cases.a]\nlr = 0.01\n[cases.b]\nlr = 0.01\n", "[cases.a] and [cases.b] have the same settings"),
    (bad_text() + "[cases.a]\n[cases.b]\nhidden = [64, 64]\n", "[cases.a] and [cases.b] have the same settings"),
    (
        bad_text() + "[cases.a]\nlr = 0.01\n[cases.b]\nlr = 0.02\n[grid]\nlr = [1e-3, 2e-3]\n",
        "[cases.a] and [cases.b] have the same settings",  # the grid sets lr in both
    ),
    # numbers the compiled program cannot hold, and sizes beyond any use (#30)
    (bad_text(train="steps = 100\nlr = 1e300"), "[train] lr: not representable in float32"),
    (bad_text(train="steps = 100\nlr = 1e-50"), "[train] lr: not representable in float32"),
    (bad_text(train="steps = 100\nn_data = 3000000000"), "n_data: expected at most 2,147,483,647"),
    (bad_text() + "[grid]\nlr = [1e-3, 1e39]\n", "[grid] lr: not representable in float32"),
    (
        bad_text(train="steps = 100000\ncheckpoints = [" + ", ".join(map(str, range(20_000))) + "]"),
        "checkpoints: expected at most 10,000 checkpoints, got [0, 1, 2, ..., 19999] (20,000 values)",
    ),
    (
        bad_text(extra="") + "[eval]\ncurves = true\ncurve_points = 1000000\n",
        "[eval] curve_points: expected an integer from 2 to 10,000",
    ),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_input_names_file_key_and_problem(text, message):
    with pytest.raises(sweep.SweepError) as e:
        parse(text)
    assert "s.toml" in str(e.value) and message in str(e.value)


def test_every_validator_accepts_good_values_and_rejects_bad_ones_with_its_message():
    cases = {  # kind: (good value, normalised, bad value)
        "pos_float": (2, 2.0, 0.0),
        "nonneg_float": (0, 0.0, float("nan")),
        "fraction": (0.5, 0.5, 1.0),
        "momentum": (0.0, 0.0, 1.0),
        "decay": (0.99, 0.99, 1.0),
        "unit_float": (1, 1.0, 1.5),
        "proposal_scale": (2, 2.0, 0.5),
        "lr_schedule": ("cosine", "cosine", "step"),
        "pos_int": (3.0, 3, 2.5),
        "nonneg_int": (0, 0, -1),
        "bool": (True, True, 1),
        "n_data": ("online", float("inf"), 0),
        "widths": ([8, 8.0], [8, 8], [8, 0]),
        "activation": ("tanh", "tanh", "swish2"),
        "init": ("lecun", "lecun", "he"),
        "optimizer": ("sgd", "sgd", "lion"),
        "precision": ("float32", "float32", "fp8"),
        "checkpoints": ([0, 10], [0, 10], [10, 10]),
        "edges": ([-1, 0], [-1.0, 0.0], [0, -1]),
        "range": ([0, 1], [0.0, 1.0], [1, 0]),
        "priors": ([0.25, 0.75], [0.25, 0.75], [0.5, 0.6]),
        "class_weights": ([1, [1, 3]], None, [1, [-1, 3]]),
        "class_array": ([0, [1, 2]], None, [0]),
        "sigmas": ([1, 2], None, [1, -2]),
        "means": ([0, [1, 2]], None, [0, 1e300]),
        "sizes": ([100, 1000.0], [100, 1000], [1000, 100]),
        "loss": ("focal", "focal", "hinge"),
        "smoothing": (0.1, 0.1, 1.0),
        "focal_gamma": (2, 2.0, 11.0),
        "curve_points": (201, 201, 1_000_000),
    }
    assert set(cases) == set(sweep.validate.VALIDATORS), "every registered kind is tested"
    for kind, (good, normal, bad) in cases.items():
        got = sweep.validate.VALIDATORS[kind](good)
        if normal is not None:
            assert got == normal and type(got) is type(normal), (kind, got)
        with pytest.raises(sweep.validate.Invalid):
            sweep.validate.VALIDATORS[kind](bad)


def test_resolver_steps_alone():
    settings = {
        "means": [np.array([[0.0]]), np.array([[-1.0], [1.0]])],
        "sigmas": [np.array([[1.0]])] * 2,
        "mu2_k2": 5.0,
        "prior1": 0.8,
        "steps": 300,
    }
    origin = {k: "f: [task]" for k in settings}
    sweep.resolve.fill_defaults(settings, origin, "f:")
    assert settings["lr"] == 1e-3 and settings["n_data"] == float("inf") and settings["hidden"] == [64, 64]
    task = sweep.resolve.task_arrays(settings, origin)
    assert task["mean"].shape == (2, 2, 1) and task["weight"].tolist() == [[1.0, 0.0], [0.5, 0.5]]
    sweep.resolve.apply_addresses(settings, origin, task)
    assert "mu2_k2" not in settings and task["mean"][1, :, 0].tolist() == [-1.0, 5.0]
    np.testing.assert_allclose(task["prior"], [0.8, 0.2])
    sweep.resolve.resolve_checkpoints(settings, origin)
    assert settings["checkpoints"] == [10, 20, 50, 100, 200, 270, 285, 300] and settings["plot_steps"] == [10, 200, 300]
    settings |= {"width": 16, "depth": 3}
    sweep.resolve.resolve_hidden(settings)
    assert settings["hidden"] == [16, 16, 16]


def test_defaults_are_the_dataclasses_own():
    from calibjax.core import metrics, train

    assert sweep.SETTINGS["hidden"].default == list(train.Static(steps=1, checkpoints=(1,)).hidden)
    assert sweep.SETTINGS["points"].default == metrics.EvalSpec().points
    assert sweep.SETTINGS["n_data"].default == train.ONLINE


# ---------------------------------------------------------------- every bad input, as a table


def _bad_inputs():
    """(id, sweep document, words the one-line error must contain): at least 100 cases."""
    nan, inf = float("nan"), float("inf")
    cases = []

    def case(what, words, **changes):
        cases.append((what, sweep_doc(**changes), words))

    for key, section in (
        ("steps", "train"),
        ("batch_size", "train"),
        ("n_data", "train"),
        ("points", "eval"),
        ("calibration_samples", "eval"),
        ("calibration_bins", "eval"),
        ("curve_points", "eval"),
        ("estimator_draws", "eval"),
        ("width", "model"),
    ):
        for v in (nan, inf, -inf, 0, -1, 2.5, "x", True, [1]):
            case(f"{key}={v!r}", [f"[{section}] {key}", "expected"], **{section: {key: v}})
    for v in (nan, inf, -1, 1.5, "x"):
        case(f"depth={v!r}", ["[model] depth", "expected"], model={"depth": v})
    for key, section, bads in (
        ("label_smoothing", "train", (nan, -0.1, 1.0, "x")),
        ("focal_gamma", "train", (nan, -1.0, 10.5, inf)),
        ("lr", "train", (nan, inf, 0.0, -1.0, "x", True)),
        ("weight_decay", "train", (nan, inf, -1.0, "x")),
        ("momentum", "train", (nan, 1.0, -0.5, "x")),
        ("hdr_mass", "eval", (nan, 0.0, 1.0, "x")),
        ("dense_mass", "eval", (nan, 1.5, "x")),
        ("sparse_mass", "eval", (inf, 0.0, "x")),
    ):
        for v in bads:
            case(f"{key}={v!r}", [f"[{section}] {key}", "expected"], **{section: {key: v}})
    for key, section, bads in (
        ("hidden", "model", ([64, nan], [0], [1.5], "x", [inf])),
        ("checkpoints", "train", ([], [0, nan], [10, 5], [10], [0], [10, 40])),
        ("density_edges", "eval", ([nan], [1.0, 0.0], [], [-inf, 0.0])),
        ("curve_range", "eval", ([0.0, inf], [nan, 1.0], [1.0, 0.0], [0.0])),
        ("plot_steps", "eval", ([15], [nan])),
        ("estimator_sizes", "eval", ([1000, 100], [1, 10], [100, 2_000_000], [100, 100.5], [100, 100], "x")),
    ):
        for v in bads:
            case(f"{key}={v!r}", [f"{key}"], **{section: {key: v}})
    for v in ([0.0, nan], [0.0, inf], [0.0, 1e300], [0.0, "x"], [0.0]):
        case(f"means={v!r}", ["[task] means"], task={"means": v})
    for v in ([1.0, 0.0], [1.0, -1.0], [1.0, 1e-300], [1.0, 1e300], [1.0, nan], [1.0, [1.0, 1.0]]):
        case(f"sigmas={v!r}", ["sigmas"], task={"sigmas": v})
    for v in ([nan, 0.5], [0.5, 0.6], [1e-12, 1 - 1e-12], [0.5], "x"):
        case(f"priors={v!r}", ["[task] priors"], task={"priors": v})
    for v in ([1.0, nan], [1.0, inf], [1.0, -1.0], [1.0, [nan, 1.0]]):
        case(f"weights={v!r}", ["[task] weights"], task={"weights": v})
    for key, section in (
        ("activation", "model"),
        ("init", "model"),
        ("optimizer", "train"),
        ("matmul_precision", "train"),
        ("loss", "train"),
    ):
        for v in ("nope", 1):
            case(f"{key}={v!r}", [f"[{section}] {key}", "expected one of"], **{section: {key: v}})
    for v in (0, nan, inf, -1, [1, 1], [-1], 10**12, "x"):
        case(f"seeds={v!r}", ["seeds"], seeds=v)
    for v in ("..", ".", "a/b", "", ".hidden"):
        case(f"name={v!r}", ["name"], name=v)
    for axis, words in (
        ({"num": nan, "linspace": [0.0, 1.0]}, ["lr.num"]),
        ({"num": 10**9, "linspace": [0.1, 1.0]}, ["lr.num", "--max-runs"]),
        ({"range": [0.1, 1.0], "step": 0.0}, ["lr.step"]),
        ({"range": [0.1, 1.0], "step": nan}, ["lr.step"]),
        ({"range": [0.0, 1e12], "step": 1e-3}, ["lr.range", "--max-runs"]),
        ({"linspace": [0.0, inf], "num": 3}, ["lr.linspace"]),
        ({"logspace": [0.0, 1.0], "num": 3}, ["lr.logspace"]),
        ({"linspace": [0.1, 1.0], "num": 3, "int": "yes"}, ["lr.int"]),
        ([], ["lr"]),
        ([nan], ["lr"]),
        ("fast", ["lr"]),
    ):
        case(f"grid lr={axis!r}", words, grid={"lr": axis})
    case(
        "a grid of 1e12 runs",
        ["runs, more than", "--max-runs"],
        grid={
            "mu2": {"linspace": [0.0, 1.0], "num": 10**4},
            "lr": {"linspace": [0.1, 1.0], "num": 10**4},
            "sigma1": {"linspace": [0.5, 1.0], "num": 10**4},
        },
    )
    case(
        "steps x batch_size >= 2^31",
        ["steps x batch_size"],
        train={"steps": 2**30, "checkpoints": [2**30]},
        model={"hidden": [8]},
    )
    for key, v in (
        ("mu2", nan),
        ("mu2", 1e300),
        ("sigma1", 0.0),
        ("sigma1", 1e300),
        ("prior1", 1.0),
        ("prior1", nan),
        ("mu9", 1.0),
        ("weight1_k1", -1.0),
        ("bogus", 1.0),
    ):
        case(f"case {key}={v!r}", [key], cases={"c": {key: v}})
    case(
        "label_smoothing without its loss",
        ["label_smoothing", "used only with loss", "cross_entropy"],
        train={"label_smoothing": 0.1},
    )
    case(
        "focal_gamma with another loss",
        ["focal_gamma", "used only with loss", "brier"],
        train={"loss": "brier"},
        cases={"c": {"focal_gamma": 2.0}},
    )
    return cases


BAD_INPUTS = _bad_inputs()


def test_there_are_at_least_100_bad_inputs():
    assert len(BAD_INPUTS) >= 100, len(BAD_INPUTS)


@pytest.mark.parametrize("what,doc,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_every_bad_input_is_one_clear_error_before_anything_runs(what, doc, words):
    import time

    text = to_toml(doc)
    t0 = time.perf_counter()
    with pytest.raises(sweep.SweepError) as e:
        sweep.parse(tomllib.loads(text), "s.toml", text)
    message = str(e.value)
    assert time.perf_counter() - t0 < 1.0  # refused before expanding anything
    assert message.startswith("s.toml:") and "\n" not in message, message
    for w in words:
        assert w in message, (what, message)


def test_comments_and_spacing_do_not_change_the_sweep_but_a_value_does():
    a = parse(BASE)
    b = parse("# a note\n" + BASE.replace(" = ", " =  ") + "\n# the end\n")
    c = parse(BASE.replace("steps = 100", "steps = 101").replace("100]", "101]"))
    assert a.sha256 == b.sha256 != c.sha256


def test_per_step_features_are_compiled_in_only_for_the_runs_that_use_them():
    sw = sweep.parse(sweep_doc(grid={"ema_decay": [0.0, 0.99], "proposal_scale": [1.0, 2.0]}))
    for r in sw.runs:
        s = sweep.static_of(r)
        assert (s.ema, s.importance) == (r.settings["ema_decay"] > 0, r.settings["proposal_scale"] > 1)
    assert {(s.ema, s.importance) for s in sw.groups[0]} == {(a, b) for a in (False, True) for b in (False, True)}


# ---------------------------------------------------------------- run identity across versions

# Run hashes that calibjax 0.9.0 wrote for the shipped sweeps (runs.parquet's run_hash): results
# directories written then stay valid only while these bytes do not change.
HASHES_0_9 = {
    "blog": {
        0: "db64932a0172bb9eeaffbe0aa10d3d76",
        12: "d1ff4c6fc4e570eccc949f324fc016d0",
        23: "9d94f8957276102a6b1789d3bea4c495",
    },
    "capacity": {
        0: "6cfc6252a45e80248f5108edbf875b9d",
        48: "0a506352121f4e68cfe3d4eb380f32f5",
        95: "bfb195cab6cae30422c17f6bfb334e5e",
    },
    "dataset_size": {
        0: "58202dcda4030013c1fec3f88fb7ad98",
        60: "24ec4576a888de249be8febf6db0fc57",
        119: "ec73391344b4bdd71edb32a255925658",
    },
    "losses": {
        0: "04ccbb46a495f9d2c52a9c08dbe50569",
        48: "bcd3761302a01af3db4569f1990d0a2f",
        95: "12107c8bcb8aed37251cc40e1bc8fa48",
    },
    "multiclass2d": {
        0: "339886756b653482b3610ec177d0373c",
        8: "9bb08df4c0b6d13d98561ee1105d5d42",
        15: "bcf66ff84fbeabe3225702d215a79130",
    },
    "noise_floor": {
        0: "81a41bf9a0f7a037a2a8a865e74af822",
        72: "507360964505d69483bc75767eb1c671",
        143: "c8c5b4f3ca63142d0f9afc3970722607",
    },
    "tail_oversampling": {
        0: "7e881b961ebb2e5a06e656c663f7521c",
        32: "bfca79ea6626af91043cd446283c1985",
        63: "6f61048d88280370005ef5d94891de0a",
    },
    "estimators": {
        0: "6c476c9f6b6133d3a956b84a40652555",
        6: "db54049b85045f97f94a757af45c14ae",
        11: "62d36477bd702ad1bd847537a700519d",
    },
}


# Settings a shipped sweep gained after 0.9.0, which make its runs other runs (their hashes too):
# taken out to compare the format with 0.9.0's bytes.
ADDED_SINCE_0_9 = {"losses": "kl_split = true"}


@pytest.mark.parametrize("name", sorted(HASHES_0_9))
def test_run_hashes_are_the_bytes_0_9_wrote(name):
    text = (ROOT / "sweeps" / f"{name}.toml").read_text()
    added = ADDED_SINCE_0_9.get(name)
    if added:
        assert added in text
        text = "\n".join(line for line in text.splitlines() if not line.startswith(added))
    sw = sweep.parse(tomllib.loads(text), f"{name}.toml", text)
    ids = sorted(HASHES_0_9[name])
    assert dict(zip(ids, sw.run_hashes(ids), strict=True)) == HASHES_0_9[name]
    assert sweep.runs_table(sw)["run_hash"].iloc[ids].tolist() == [HASHES_0_9[name][i] for i in ids]
    if added:  # the added setting is part of the runs' identity
        assert sweep.load(ROOT / "sweeps" / f"{name}.toml").run_hashes(ids) != sw.run_hashes(ids)


def test_a_setting_added_later_leaves_every_existing_hash_alone():
    """A new dynamic or static setting enters the hash only where a run moves it off its default."""
    from calibjax.core.settings import Setting

    sw = sweep.load(ROOT / "sweeps" / "blog.toml")
    run, static = sw.run(3), sw.block_groups[0][0]
    json = sweep.static_json(static)
    trial = {**sweep.schema.DYNAMIC, "trial": Setting("train", "nonneg_float", 0.0)}
    at_default = sweep.hash_parts(dataclasses.replace(run, settings={**run.settings, "trial": 0.0}), json, trial)
    assert at_default == sweep.hash_parts(run, json)
    moved = sweep.hash_parts(dataclasses.replace(run, settings={**run.settings, "trial": 0.5}), json, trial)
    assert moved != at_default and '"trial": 0.5' in moved[1]
    # a static flag added later (off by default) is hashed only when on
    assert sweep.identity._hashed({"steps": 5, "new_flag": False}, {"steps"}, {}) == {"steps": 5}
    assert sweep.identity._hashed({"steps": 5, "new_flag": True}, {"steps"}, {}) == {"steps": 5, "new_flag": True}
