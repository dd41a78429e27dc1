"""Training: vmapped runs equal single runs, finite data is finite, divergence is contained."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from calibjax.core import metrics, train
from calibjax.storage import tables

from conftest import SMALL, example


def fields(r: train.RunResult) -> dict:
    """The numbers compared between runs: scalars, density bins and curves."""
    sc, d = r.checkpoints.scalars, r.checkpoints.density
    return {
        "kl": sc.kl,
        "tv": sc.tv,
        "max_err": sc.max_err,
        "accuracy": sc.accuracy,
        "loss": sc.loss,
        "bin_kl": d.kl_contribution,
        "curve_model": r.curves.model_prob,
        "true_ece": sc.true_ece,
    }


def run(r: train.RunResult, i: int) -> train.RunResult:
    return jax.tree.map(lambda v: v[i], r)


def dyn(n=1, lr=1e-3, n_data=1000, seed=0, **kw):
    return train.make_dynamic(example(n), lr=lr, n_data=n_data, seed=seed, **kw)


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    a, b = fields(a), fields(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=rtol, atol=atol, err_msg=k)


def mixed_runs():
    return [
        dyn(1, seed=0),
        dyn(2, lr=3e-3, seed=1),
        dyn(3, n_data=train.ONLINE, seed=2),
        dyn(2, lr=1e-2, n_data=50, seed=3, weight_decay=1e-3),
        dyn(1, lr=2e-4, seed=4),
    ]


@pytest.mark.slow
def test_vmapped_runs_match_each_run_alone():
    runs = mixed_runs()
    batched = train.batched_train_fn(SMALL, inner_batch=2)(train.stack_dynamic(runs + runs[-1:]))
    for i, d in enumerate(runs):
        alone = train.train_single(SMALL, d)
        assert_same(run(batched, i), alone)


@pytest.mark.slow
def test_a_runs_numbers_do_not_depend_on_its_batch_mates_or_devices():
    runs = mixed_runs()
    target = runs[2]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("runs",))
    a = train.batched_train_fn(SMALL, 2, mesh)(train.stack_dynamic([target, runs[0], runs[1], runs[3]] * 2))
    b = train.batched_train_fn(SMALL, 1, None)(train.stack_dynamic([runs[4], runs[3], target, runs[0]]))
    assert_same(run(a, 0), run(b, 2))


@pytest.mark.slow
def test_finite_data_is_memorised_and_online_data_is_not():
    static = dataclasses.replace(SMALL, steps=1500, checkpoints=(1000, 1500), hidden=(64, 64), curve_points=0)
    runs = [dyn(2, lr=3e-3, n_data=n, seed=s) for n in (8, train.ONLINE) for s in range(2)]
    out = train.batched_train_fn(static, inner_batch=4)(train.stack_dynamic(runs))
    bayes = float(out.bayes_loss[0])  # H(C|X) = 0.43 nats for example 2
    final_loss = np.asarray(out.checkpoints.scalars.loss[:, -1])
    assert np.all(final_loss[:2] < 0.25 * bayes), (final_loss, bayes)  # 8 examples: memorised
    assert np.all(final_loss[2:] > 0.8 * bayes), (final_loss, bayes)  # online: cannot beat Bayes
    kl = np.asarray(out.checkpoints.scalars.kl[:, -1])
    assert np.all(kl[:2] > 5 * kl[2:])  # and memorising is not learning P


@pytest.mark.slow
def test_a_diverging_run_is_marked_and_leaves_its_batch_mates_alone():
    good, bad = dyn(1, seed=5), train.make_dynamic(example(1), lr=1e30, n_data=1000, seed=6)
    out = train.batched_train_fn(SMALL, inner_batch=2)(train.stack_dynamic([good, bad]))
    out = jax.tree.map(np.asarray, out)
    assert_same(run(out, 0), train.train_single(SMALL, good))
    t = tables.chunk_tables(SMALL, [10, 11], out)
    assert t["status"]["status"].tolist() == ["ok", "diverged"]
    # Diverged means nan in every model-dependent number of every table from the divergence on
    # (here from the first trained checkpoint); the task's truth columns stay; run 10 is finite.
    for name, df in t.items():
        if name == "status":
            continue
        values = [
            c
            for c in df.columns
            if c not in ("run_id", "step", "class", "x", "log10_density_lo", "log10_density_hi", "conf_lo", "conf_hi")
        ]
        wild = df[(df["run_id"] == 11) & (df["step"] > 0)]
        for col in values:
            assert wild[col].isna().all() != (col in tables.TRUTH_COLUMNS), (name, col)
    m = t["metrics"]
    measured = [c for c in m.columns[2:] if c not in metrics.SPLIT]  # (the split: eval.kl_split, off here)
    assert np.isfinite(m.loc[(m["run_id"] == 10) & (m["step"] > 0), measured].to_numpy()).all()
    before = t["metrics"][(t["metrics"]["run_id"] == 11) & (t["metrics"]["step"] == 0)]
    assert np.isfinite(before["kl"]).all()  # at step 0 it had not diverged yet


@pytest.mark.slow
def test_dynamic_settings_do_not_retrace(monkeypatch):
    traces = []
    original = train.train_run
    monkeypatch.setattr(train, "train_run", lambda s, d: traces.append(1) or original(s, d))
    fn = train.batched_train_fn(SMALL, inner_batch=2)
    fn(train.stack_dynamic([dyn(1), dyn(2)]))
    varied = [
        train.make_dynamic(example(3), lr=5e-2, weight_decay=0.1, momentum=0.5, n_data=train.ONLINE, seed=99),
        train.make_dynamic(
            example(2).replace(log_prior=np.log(np.array([0.9, 0.1], np.float32))),
            lr=1e-4,
            n_data=7,
            seed=3,
            lr_schedule="cosine",
            warmup_steps=10,
            final_lr_ratio=0.1,
            ema_decay=0.9,
            proposal_scale=2.0,
        ),
    ]
    fn(train.stack_dynamic(varied))
    assert len(traces) == 1
    # with the per-step features compiled in, their values are dynamic too
    featured = train.batched_train_fn(dataclasses.replace(SMALL, ema=True, importance=True), inner_batch=2)
    featured(train.stack_dynamic(varied))
    featured(train.stack_dynamic([dyn(1, ema_decay=0.5, proposal_scale=3.0), dyn(2, ema_decay=0.99)]))
    assert len(traces) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", train.OPTIMIZERS)
def test_every_optimizer_reduces_the_error(name):
    static = dataclasses.replace(SMALL, optimizer=name, curve_points=0)
    out = train.train_single(static, dyn(1, lr=1e-2 if name != "sgd" else 0.3, momentum=0.9))
    kl = np.asarray(out.checkpoints.scalars.kl)
    assert kl[-1] < 0.5 * kl[0], kl


def test_learning_rate_schedules_match_their_closed_forms():
    steps, lr = 1000, 1e-3
    count = jax.numpy.arange(steps)
    rate = lambda **kw: np.asarray(
        train.learning_rate(
            jax.tree.map(jax.numpy.asarray, dyn(lr=lr, **kw)),  # noqa: E731
            steps,
            count,
        ),
        np.float64,
    )
    # constant, and any schedule that cannot decay, is exactly lr: the same bits as a plain lr
    assert (rate() == np.float32(lr)).all()
    assert (rate(lr_schedule="cosine", final_lr_ratio=1.0) == np.float32(lr)).all()
    t = np.arange(steps)
    np.testing.assert_allclose(rate(lr_schedule="cosine"), lr * 0.5 * (1 + np.cos(np.pi * t / steps)), atol=1e-9)
    np.testing.assert_allclose(rate(lr_schedule="linear", final_lr_ratio=0.1), lr * (1 - 0.9 * t / steps), rtol=1e-5)
    warm = rate(lr_schedule="cosine", warmup_steps=100, final_lr_ratio=0.0)
    np.testing.assert_allclose(warm[:100], lr * (t[:100] + 1) / 100, rtol=1e-5)
    progress = (t[100:] - 100) / 900
    np.testing.assert_allclose(warm[100:], lr * 0.5 * (1 + np.cos(np.pi * progress)), atol=1e-9)
    np.testing.assert_allclose(rate(warmup_steps=10)[:12], lr * np.minimum(1, (t[:12] + 1) / 10), rtol=1e-6)


def test_proposal_draws_wider_inputs_whose_weights_keep_the_expected_loss():
    static = train.Static(steps=1, checkpoints=(1,), batch_size=4096, importance=True)
    d = jax.tree.map(jax.numpy.asarray, dyn(3, n_data=train.ONLINE, proposal_scale=2.0))
    data_key, batch_key = jax.random.split(jax.random.key(3))
    x, c, w = (
        np.asarray(v) for v in jax.jit(lambda: train.draw_batch(static, d, data_key, batch_key, jax.numpy.int32(0)))()
    )
    x = x[:, 0].astype(np.float64)
    # example 3: class 0 ~ N(0, 2), class 1 ~ N(3, 1); drawn with sigmas x 2
    assert abs(x[c == 0].std() - 4.0) < 0.2 and abs(x[c == 1].std() - 2.0) < 0.1
    # importance weights: p(x|c) / r(x|c), whose mean under r is 1, and weighted moments are the task's
    ratio = lambda v, s: 2.0 * np.exp(-0.5 * v**2 / s**2 + 0.5 * v**2 / (2 * s) ** 2)  # noqa: E731
    np.testing.assert_allclose(w[c == 0], ratio(x[c == 0], 2.0), rtol=1e-4)
    np.testing.assert_allclose(w[c == 1], ratio(x[c == 1] - 3.0, 1.0), rtol=1e-4)
    for k, mu, s in ((0, 0.0, 2.0), (1, 3.0, 1.0)):
        assert abs(np.mean(w[c == k]) - 1) < 0.05
        assert abs(np.mean(w[c == k] * (x[c == k] - mu) ** 2) - s**2) < 0.1 * s**2
    # at scale 1 the proposal is the task: the same examples as without it, weights exactly 1
    same = jax.tree.map(jax.numpy.asarray, dyn(3, n_data=train.ONLINE))
    x1, c1, w1 = jax.jit(lambda: train.draw_batch(static, same, data_key, batch_key, jax.numpy.int32(0)))()
    plain = dataclasses.replace(static, importance=False)
    x0, c0, w0 = jax.jit(lambda: train.draw_batch(plain, same, data_key, batch_key, jax.numpy.int32(0)))()
    assert w0 is None and (np.asarray(w1) == 1.0).all()
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c0))


@pytest.mark.slow
def test_ema_evaluates_the_debiased_average_of_the_weights():
    """After one update the debiased average is that update's weights (the numbers equal a plain
    run's); later it lags them (the numbers differ)."""
    static = dataclasses.replace(SMALL, steps=20, checkpoints=(1, 20), curve_points=0)
    plain = train.train_single(static, dyn(1, lr=1e-2))
    ema = train.train_single(dataclasses.replace(static, ema=True), dyn(1, lr=1e-2, ema_decay=0.9))
    kl_plain, kl_ema = np.asarray(plain.checkpoints.scalars.kl), np.asarray(ema.checkpoints.scalars.kl)
    np.testing.assert_allclose(kl_ema[0], kl_plain[0], rtol=1e-5)
    assert abs(kl_ema[1] - kl_plain[1]) > 1e-3 * kl_plain[1]
    # training itself is untouched: the same losses
    np.testing.assert_array_equal(np.asarray(plain.checkpoints.scalars.loss), np.asarray(ema.checkpoints.scalars.loss))


def test_no_result_shape_depends_on_the_evaluation_points():
    """output_shapes traces with at most SHAPE_POINTS points (a billion-point sweep must reach the
    memory check, not overflow int32 indices while tracing): valid only while no shape depends on them."""
    small, large = (
        dataclasses.replace(SMALL, eval=dataclasses.replace(SMALL.eval, points=n)) for n in (64, train.SHAPE_POINTS + 1)
    )
    shapes = [
        jax.eval_shape(functools.partial(train.train_run, s), train.placeholder_dynamic(s)) for s in (small, large)
    ]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes[0]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), shapes[1]
    )
    assert jax.tree.map(lambda a: a.shape, train.output_shapes(large)) == jax.tree.map(lambda a: a.shape, shapes[1])
