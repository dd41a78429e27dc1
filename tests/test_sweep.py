"""Sweep files: expansion, grids, grouping, and every kind of bad input."""

import tomllib

import numpy as np
import pytest

from calibjax import engine, sweep

BASE = """
name = "t"
seeds = 2
[task]
means = [0.0, 3.0]
sigmas = [1.0, 1.0]
[train]
steps = 100
checkpoints = [10, 100]
"""


def parse(text):
    return sweep.parse(tomllib.loads(text), "s.toml", text)


def test_cases_times_seeds_expand_in_order_with_overrides():
    sw = parse(BASE + "[cases.a]\n[cases.b]\nmu2 = 1.5\nsigmas = [2.0, 1.0]\nlr = 0.01\n")
    runs = engine.runs_table(sw)
    assert list(runs["run_id"]) == [0, 1, 2, 3]
    assert list(runs["case"]) == ["a", "a", "b", "b"] and list(runs["seed"]) == [0, 1, 0, 1]
    b = runs[runs["case"] == "b"].iloc[0]
    assert (b["mu2"], b["sigma1"], b["lr"]) == (1.5, 2.0, 0.01)
    assert runs.loc[0, "lr"] == 1e-3 and runs.loc[0, "n_data"] == np.inf  # defaults: lr 1e-3, online


def test_grid_ranges_priors_and_one_group_for_dynamic_settings():
    sw = parse(BASE + """
[grid]
lr = {logspace = [1e-4, 1e-2], num = 3}
prior1 = [0.5, 0.9]
n_data = [100, "online"]
mu2 = {linspace = [1.0, 2.0], num = 2}
""")
    runs = engine.runs_table(sw)
    assert len(runs) == 3 * 2 * 2 * 2 * 2
    np.testing.assert_allclose(sorted(runs["lr"].unique()), [1e-4, 1e-3, 1e-2])
    np.testing.assert_allclose(runs["prior1"] + runs["prior2"], 1.0)
    assert set(runs["n_data"]) == {100.0, np.inf}
    assert runs["group"].nunique() == 1  # all dynamic: one compiled program


def test_static_settings_make_groups():
    sw = parse(BASE + "[grid]\nwidth = [16, 32]\ndepth = [1, 2]\nbatch_size = {range = [32, 64], step = 32, int = true}\n")
    runs = engine.runs_table(sw)
    assert runs["group"].nunique() == 8
    assert set(runs["hidden"]) == {"16", "32", "16-16", "32-32"}


def test_mixture_classes_are_padded_with_zero_weight_components():
    sw = parse(BASE.replace("means = [0.0, 3.0]", "means = [0.0, [[-2.0], [2.0]]]")
               .replace("sigmas = [1.0, 1.0]", "sigmas = [1.0, 0.5]\nweights = [1.0, [1.0, 3.0]]"))
    t = sw.runs[0].task
    assert t["mean"].shape == (2, 2, 1)
    np.testing.assert_allclose(t["weight"], [[1.0, 0.0], [0.25, 0.75]])


def sweep_text(task='means = [0.0, 3.0]\nsigmas = [1.0, 1.0]', train="steps = 100", extra=""):
    return f"seeds = 1\n{extra}\n[task]\n{task}\n[train]\n{train}\n"


OK_TASK = "means = [0.0, 1.0]\nsigmas = [1.0, 1.0]"
BAD = [
    (sweep_text(train="steps = 100\nlrr = 0.1"), "[train] unknown key 'lrr'"),
    (sweep_text(task="means = [0.0, 1.0]"), "sigmas: missing required setting"),
    (sweep_text(train="lr = 0.1"), "steps: missing required setting"),
    (sweep_text(task="means = [0.0, 1.0]\nsigmas = [1.0, 0.0]"), "sigmas: every sigma must be > 0"),
    (sweep_text(task=OK_TASK + "\npriors = [-0.5, 1.5]"), "priors must be > 0"),
    (sweep_text(task=OK_TASK + "\npriors = [0.5, 0.6]"), "priors must sum to 1"),
    (sweep_text(task="means = [0.0, 1.0]\nsigmas = [1.0, 1.0, 2.0]"), "sigmas: 3 classes, but means has 2"),
    (sweep_text(task=OK_TASK + "\npriors = [0.2, 0.3, 0.5]"), "priors: 3 values"),
    (sweep_text(task="means = [[0.0, 1.0], 1.0]\nsigmas = [1.0, 1.0]"), "every class needs the same dimension"),
    (sweep_text(train="steps = 100\ncheckpoints = [10, 200]"), "checkpoints: step 200 is beyond steps = 100"),
    (sweep_text(train='steps = 100\nlr = "fast"'), "lr: expected a positive number, got 'fast'"),
    (sweep_text(train='steps = "many"'), "steps: expected a positive integer"),
    (sweep_text(task='means = [0.0, "x"]\nsigmas = [1.0, 1.0]'), "means: class 2: expected a number"),
    (sweep_text() + "[grid]\nsigma2 = [1.0, -1.0]\n", "[grid] sigma2: sigma must be > 0"),
    (sweep_text() + "[grid]\nlr = {logspace = [0, 1], num = 3}\n", "lr.logspace: ends must be > 0"),
    (sweep_text() + "[cases.a]\nmu7 = 1.0\n", "[cases.a] mu7: no such entry"),
    (sweep_text() + '[model]\nactivation = "swish2"\n', "activation: expected one of"),
    (sweep_text(extra="bogus = 1"), "unknown key 'bogus' at top level"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_input_names_file_key_and_problem(text, message):
    with pytest.raises(sweep.SweepError) as e:
        parse(text)
    assert "s.toml" in str(e.value) and message in str(e.value)
