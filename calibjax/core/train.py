"""Training: one run is a pure function of its dynamic settings; a chunk of runs is one program.

``train_run(static, dyn)`` trains one classifier and evaluates it at every
checkpoint. ``Static`` holds everything that fixes a shape or the program and
is hashed into the jit cache (one compile per group of runs); ``Dynamic``
holds the numbers (task parameters, learning rate, dataset size, seed) that
``vmap`` maps over, so sweeping them never retraces.

Step loop: a ``lax.scan`` over checkpoint segments whose body runs a
``fori_loop`` of that segment's length and then evaluates, so the step body
and the evaluation are each compiled once whatever the checkpoints are.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from calibjax.core import estimators, kernel, losses, metrics, rng, tasks
from calibjax.core.model import MLP
from calibjax.core.settings import declared, setting

# Bumped whenever a change alters the numbers a run gives (data streams, initialisation, metrics),
# so that resume and merge refuse to join results of two such versions; CHANGELOG.md says what each
# version changed.
NUMBERS_VERSION = 8

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")  # the decay after warm-up; index = Dynamic.lr_schedule
# float32 by default: on GPUs JAX otherwise runs float32 matmuls in TF32 (10-bit mantissa), which
# adds noise of about 1e-3 to every logit, the size of the errors this tool measures.
PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")


@dataclass(frozen=True, kw_only=True)
class Static:
    """Settings that change shapes or the program; runs are grouped by them. Each field declared
    with ``setting`` is the sweep setting of the same name (``calibjax.core.settings``)."""

    steps: int = setting("train", "pos_int", column=18)
    # None in a sweep file: 10, 20, 50, ..., then 0.9, 0.95 x steps and steps
    checkpoints: tuple[int, ...] = setting("train", "checkpoints", sweep_default=None)
    num_classes: int = 2
    num_components: int = 1
    dim: int = 1
    hidden: tuple[int, ...] = setting("model", "widths", (64, 64))
    activation: str = setting("model", "activation", "relu", column=1)
    init: str = setting("model", "init", "torch", column=2)
    optimizer: str = setting("train", "optimizer", "adam", column=3)
    # losses.LOSSES; its parameters are dynamic (label_smoothing, focal_gamma)
    loss: str = setting("train", "loss", "cross_entropy", column=4)
    batch_size: int = setting("train", "pos_int", 64, column=15)
    eval: metrics.EvalSpec = field(default_factory=metrics.EvalSpec)
    curve_points: int = 0  # 0: no posterior curves; else points per axis (1-D and 2-D tasks)
    matmul_precision: str = setting("train", "precision", "float32", column=16)
    # Features that cost every step, compiled in only for the runs that use them (each is a dynamic
    # setting whose value is ignored when its flag is off; sweep.static_of sets the flags from it):
    ema: bool = False  # keep a moving average of the weights (Dynamic.ema_decay > 0)
    importance: bool = False  # draw from a widened proposal with importance weights (proposal_scale != 1)
    # How the hidden layers' products are computed: "xla" (XLA's dot) or "kernel" (calibjax's CPU
    # kernel, ``kernel``). Set by the engine from its layout, not by the sweep: like the
    # vectorisation width it is recorded per results directory, so it is not part of a run's identity.
    dense: str = "xla"

    @property
    def model(self) -> MLP:
        return MLP(self.hidden, self.num_classes, self.activation, self.init, self.dense)

    @property
    def macs_per_example(self) -> int:
        widths = (self.dim, *self.hidden, self.num_classes)
        return sum(a * b for a, b in itertools.pairwise(widths))

    @property
    def flops_per_step(self) -> float:
        """Dense-layer FLOPs of one optimiser update (forward + backward = 3x forward)."""
        return 6.0 * self.macs_per_example * self.batch_size

    @property
    def flops_per_run(self) -> float:
        """Training plus the forward passes of every checkpoint's evaluation."""
        points = (
            self.eval.points
            + self.eval.calibration_samples
            + self.curve_points**self.dim
            + self.eval.estimator_draws * max(self.eval.estimator_sizes, default=0)
        )
        return self.steps * self.flops_per_step + len(self.checkpoints) * 2.0 * self.macs_per_example * points


ONLINE = math.inf  # n_data of online training (fresh examples every step): infinitely many examples


def _n_data(n) -> np.int32:
    """A dataset size, or ONLINE: 0 inside the program."""
    if n == ONLINE:
        return np.int32(0)
    if int(n) < 1:
        raise ValueError(f"n_data must be a positive count or train.ONLINE, got {n!r}")
    return np.int32(n)


def _schedule(name: str) -> np.int32:
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; choose from {LR_SCHEDULES}")
    return np.int32(LR_SCHEDULES.index(name))


def _curve_range(r) -> np.ndarray:
    return np.asarray(r if r is not None else (np.nan, np.nan), np.float32)


def dynamic(section: str, kind: str, default, encode=np.float32, **kw):
    """A field of ``Dynamic`` that is a sweep setting: ``make_dynamic`` encodes its value with ``encode``."""
    return setting(section, kind, default, encode=encode, **kw)


@struct.dataclass(kw_only=True)
class Dynamic:
    """Per-run numbers; batched runs carry a leading run axis on every leaf. Every field but task
    and seed is the sweep setting of the same name (``setting``): ``make_dynamic`` builds it from
    those settings, and a run's hash covers them."""

    task: tasks.GaussianTask
    lr: jax.Array = dynamic("train", "pos_float", 1e-3, column=7, independent=True)  # () float32, the peak lr
    # () int32, index into LR_SCHEDULES: decay from lr after warm-up
    lr_schedule: jax.Array = dynamic("train", "lr_schedule", "constant", _schedule, column=8, independent=True)
    # () int32, linear warm-up from lr / warmup_steps to lr; 0: none
    warmup_steps: jax.Array = dynamic("train", "nonneg_int", 0, np.int32, column=9)
    # () float32, cosine and linear decay end at lr x this at the last step
    final_lr_ratio: jax.Array = dynamic("train", "unit_float", 0.0, column=10, independent=True)
    # () float32; L2 for adam/sgd, decoupled for adamw
    weight_decay: jax.Array = dynamic("train", "nonneg_float", 0.0, column=11, independent=True)
    momentum: jax.Array = dynamic("train", "momentum", 0.0, column=12, independent=True)  # () float32; sgd only
    # () int32; dataset size; 0 inside the program stands for ONLINE (n_data = "online" in a sweep file)
    n_data: jax.Array = dynamic("train", "n_data", ONLINE, _n_data, column=17, column_type=float, independent=True)
    seed: jax.Array  # () uint32
    # (2,) float32 x range of the posterior curves; nan: mean +- 4 sigma
    curve_range: jax.Array = dynamic("eval", "range", None, _curve_range)
    # () float32; > 0 (with static.ema): checkpoints evaluate an exponential moving average of the
    # weights (bias-corrected, as Adam's moments), not the weights
    ema_decay: jax.Array = dynamic("train", "decay", 0.0, column=13)
    # () float32 (with static.importance): training inputs drawn with every sigma x this,
    # importance-weighted by p(x|c) / r(x|c), so the expected loss is unchanged
    proposal_scale: jax.Array = dynamic("train", "proposal_scale", 1.0, column=14)
    label_smoothing: jax.Array = dynamic("train", "smoothing", 0.0, column=5)  # () float32, alpha of "label_smoothing"
    focal_gamma: jax.Array = dynamic("train", "focal_gamma", 0.0, column=6)  # () float32, gamma of loss = "focal"


DYNAMIC_SETTINGS = declared(Dynamic)  # the settings a run's Dynamic holds besides its task and seed


class Curves(NamedTuple):
    """Posterior curves of one run (1-D and 2-D tasks): rows of curves.parquet."""

    x: jax.Array  # (P, D) float32 points (a P-point line, or a grid of P = points^2)
    true_prob: jax.Array  # (P, M) float32 exact P(c | x)
    model_prob: jax.Array  # (C, P, M) float32 the model's q(c | x) at each checkpoint


class RunResult(NamedTuple):
    """Everything one run returns; batched runs carry a leading run axis on every leaf."""

    checkpoints: metrics.Evaluation  # every leaf has a leading checkpoint axis (C, ...)
    bayes_loss: jax.Array  # () float32, H(C | X): the floor of the expected loss
    mutual_info: jax.Array  # () float32, I(C; X) = H(C) - H(C | X): kl of the priors-only classifier
    curves: Curves | None  # None unless static.curve_points


class TrainState(NamedTuple):
    params: dict
    ema: dict | None  # moving average of params (zero-initialised; debiased when read); static.ema only
    opt_state: optax.OptState
    step: jax.Array  # () int32, updates done so far
    loss_sum: jax.Array  # () float32, training loss summed since the last checkpoint


def learning_rate(dyn: Dynamic, steps: int, count: jax.Array) -> jax.Array:
    """The learning rate of update ``count`` (0-based): warm-up, then the schedule's decay.

    Warm-up: lr x (count + 1) / warmup_steps for the first warmup_steps updates. Decay over the
    remaining updates, progress p from 0 to 1: constant 1; cosine r + (1 - r)(1 + cos(pi p)) / 2;
    linear 1 - (1 - r) p, with r = final_lr_ratio. A constant schedule without warm-up is exactly
    lr (the factors are exactly 1), so it trains the same bits as a plain lr.
    """
    t = count.astype(jnp.float32)
    warmup = dyn.warmup_steps.astype(jnp.float32)
    warm = jnp.where(dyn.warmup_steps > 0, jnp.minimum(1.0, (t + 1.0) / jnp.maximum(warmup, 1.0)), 1.0)
    progress = jnp.clip((t - warmup) / jnp.maximum(steps - warmup, 1.0), 0.0, 1.0)
    r = dyn.final_lr_ratio
    decay = jnp.select(
        [dyn.lr_schedule == 1, dyn.lr_schedule == 2],
        [r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)), 1.0 - (1.0 - r) * progress],
        1.0,
    )
    return dyn.lr * warm * decay


def make_optimizer(name: str, dyn: Dynamic, steps: int) -> optax.GradientTransformation:
    """Optimisers built from traced hyper-parameters, so lr etc. can be vmapped."""
    lr = functools.partial(learning_rate, dyn, steps)
    descend = optax.scale_by_schedule(lambda count: -lr(count))
    if name == "adam":  # PyTorch Adam: weight decay added to the gradient
        return optax.chain(optax.add_decayed_weights(dyn.weight_decay), optax.scale_by_adam(), descend)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=dyn.weight_decay)
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(dyn.weight_decay), optax.trace(decay=dyn.momentum), descend)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def draw_batch(
    static: Static, dyn: Dynamic, data_key, batch_key, step
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The mini-batch for update ``step`` (x, c and importance weights, None unless
    static.importance): examples are regenerated from their index.

    Example i of the run's dataset is ``tasks.draw(task, data_key, i)``, so a dataset of any size
    N costs no memory and N is a dynamic setting. Finite data draws indices uniformly in [0, N)
    (with replacement) from the hash of (batch_key, step); online data (N = 0) uses indices
    step*B + j, never repeated. Datasets of one seed are nested: the first N examples are the
    same for every larger N.
    """
    b = static.batch_size
    step = step.astype(jnp.uint32)
    finite_index = rng.below(rng.words(batch_key, step[None], b)[0], jnp.maximum(dyn.n_data, 1))
    online_index = (step * np.uint32(b) + jnp.arange(b, dtype=jnp.uint32)).astype(jnp.int32)
    index = jnp.where(dyn.n_data > 0, finite_index, online_index)
    if not static.importance:
        x, c = tasks.draw(dyn.task, data_key, index)
        return x, c, None
    proposal = proposal_task(dyn)
    x, c = tasks.draw(proposal, data_key, index)
    log_ratio = jax.vmap(lambda x, c: tasks.log_joint(dyn.task, x)[c] - tasks.log_joint(proposal, x)[c])(x, c)
    return x, c, jnp.exp(log_ratio)


def proposal_task(dyn: Dynamic) -> tasks.GaussianTask:
    """The distribution training inputs are drawn from: the task with every sigma x proposal_scale
    (the task itself at 1: then every importance weight is exactly 1)."""
    return dyn.task.replace(sigma=dyn.task.sigma * dyn.proposal_scale)


def curve_grid(static: Static, dyn: Dynamic) -> jax.Array:
    """Points where posterior curves are recorded: P points (1-D) or a P x P grid (2-D), (P^D, D).

    The range is dyn.curve_range on every axis, or (nan) every component's mean +- 4 sigma.
    """
    auto_lo, auto_hi = tasks.support_range(dyn.task, 4.0)
    lo = jnp.where(jnp.isnan(dyn.curve_range[0]), auto_lo, dyn.curve_range[0])
    hi = jnp.where(jnp.isnan(dyn.curve_range[1]), auto_hi, dyn.curve_range[1])
    axes = [jnp.linspace(lo[d], hi[d], static.curve_points, dtype=jnp.float32) for d in range(static.dim)]
    mesh = jnp.meshgrid(*axes, indexing="ij")
    return jnp.stack([m.reshape(-1) for m in mesh], axis=-1)


def train_run(static: Static, dyn: Dynamic) -> RunResult:
    """Train one classifier and evaluate it at every checkpoint."""
    with jax.default_matmul_precision(static.matmul_precision):
        return _train_run(static, dyn)


def _train_run(static: Static, dyn: Dynamic) -> RunResult:
    model = static.model
    init_key, data_key, batch_key = jax.random.split(jax.random.key(dyn.seed), 3)
    params = model.init(init_key, jnp.zeros((static.dim,), jnp.float32))
    optimizer = make_optimizer(static.optimizer, dyn, static.steps)
    optimum = functools.partial(
        losses.log_optimum, static.loss, label_smoothing=dyn.label_smoothing, focal_gamma=dyn.focal_gamma
    )
    ev = metrics.make_eval_set(dyn.task, static.eval, dyn.seed, optimum)
    curve_x = curve_grid(static, dyn) if static.curve_points else None

    def loss_fn(params, x, c, weight):
        loss = losses.loss_values(static.loss, model.apply(params, x), c, dyn.label_smoothing, dyn.focal_gamma)
        return (loss if weight is None else weight * loss).mean()

    # With calibjax's CPU kernel, a ReLU network's cross-entropy and its gradients are one kernel
    # call (kernel.loss_and_grads); otherwise autodiff, through the kernel's products if on.
    fused = static.dense == "kernel" and kernel.fuses(static.activation, static.loss)
    loss_and_grads = kernel.loss_and_grads if fused else jax.value_and_grad(loss_fn)

    def update(_, state: TrainState) -> TrainState:
        x, c, weight = draw_batch(static, dyn, data_key, batch_key, state.step)
        loss, grads = loss_and_grads(state.params, x, c, weight)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = (
            jax.tree.map(lambda e, p: dyn.ema_decay * e + (1.0 - dyn.ema_decay) * p, state.ema, params)
            if static.ema
            else None
        )
        return TrainState(params, ema, opt_state, state.step + 1, state.loss_sum + loss)

    def evaluated_params(state: TrainState) -> dict:
        """The weights a checkpoint evaluates: the debiased moving average when ema_decay > 0."""
        if not static.ema:
            return state.params
        use_ema = (dyn.ema_decay > 0) & (state.step > 0)
        debias = 1.0 - dyn.ema_decay ** state.step.astype(jnp.float32)
        return jax.tree.map(
            lambda e, p: jnp.where(use_ema, e / jnp.where(use_ema, debias, 1.0), p), state.ema, state.params
        )

    def segment(state: TrainState, length):
        state = jax.lax.fori_loop(0, length, update, state)
        params = evaluated_params(state)
        log_q = jax.nn.log_softmax(model.apply(params, ev.x))
        log_q_cal = jax.nn.log_softmax(model.apply(params, ev.cal_x))
        loss = jnp.where(length > 0, state.loss_sum / jnp.maximum(length, 1), jnp.nan)
        evaluation = metrics.evaluate(ev, log_q, log_q_cal, static.eval, loss)
        if static.eval.temperature_scaling:
            evaluation = evaluation._replace(recalibrated=metrics.recalibrate(ev, log_q, log_q_cal, static.eval))
        if static.eval.estimator_sizes:
            target = estimators.targets(ev, log_q, evaluation.scalars)
            forward = lambda x: jax.nn.log_softmax(model.apply(params, x))  # noqa: E731
            evaluation = evaluation._replace(
                estimators=estimators.benchmark(dyn.task, dyn.seed, forward, target, static.eval)
            )
        curve = jax.nn.softmax(model.apply(params, curve_x)) if curve_x is not None else None
        return state._replace(loss_sum=jnp.zeros_like(state.loss_sum)), (evaluation, curve)

    lengths = np.diff(np.asarray((0, *static.checkpoints))).astype(np.int32)
    state = TrainState(
        params,
        jax.tree.map(jnp.zeros_like, params) if static.ema else None,
        optimizer.init(params),
        jnp.int32(0),
        jnp.float32(0.0),
    )
    _, (evaluations, curve_model) = jax.lax.scan(segment, state, jnp.asarray(lengths))
    curves = None
    if curve_x is not None:
        true_prob = jnp.exp(jax.vmap(tasks.log_posterior, (None, 0))(dyn.task, curve_x))
        curves = Curves(curve_x, true_prob, curve_model)
    return RunResult(evaluations, metrics.conditional_entropy(ev), ev.mutual_info, curves)


@functools.partial(jax.jit, static_argnums=0)
def train_single(static: Static, dyn: Dynamic) -> RunResult:
    """One run alone (the reference the batched program is tested against)."""
    return train_run(static, dyn)


def batched_train_fn(static: Static, inner_batch: int, mesh: jax.sharding.Mesh | None = None):
    """The function that trains a chunk of runs (leading axis R) in one program.

    Runs are processed ``inner_batch`` at a time (``lax.map`` over vmapped
    groups), which keeps each group's parameters and activations cache
    resident on CPU; on a GPU, a large inner batch fills the device. With a
    mesh, the run axis is split over its devices with ``shard_map`` so each
    device trains its own runs with no communication. R must be a multiple of
    devices x inner_batch: then every run is computed in a vmapped batch of
    exactly inner_batch, and its numbers do not depend on R, the device count
    or its batch mates (``planning`` explains why the width itself matters).
    """

    return batched(functools.partial(train_run, static), inner_batch, mesh)


def batched(fn, inner_batch: int, mesh: jax.sharding.Mesh | None = None):
    """``fn`` (one run's arguments -> its outputs) jitted over a leading run axis, laid out as
    ``batched_train_fn`` describes: ``inner_batch`` runs vmapped at a time, split over the mesh's devices."""

    def local(*args):
        return jax.lax.map(lambda a: fn(*a), args, batch_size=inner_batch)

    if mesh is None or mesh.size == 1:
        return jax.jit(local)
    spec = jax.sharding.PartitionSpec("runs")
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def stack_dynamic(dyns: list[Dynamic]) -> Dynamic:
    return jax.tree.map(lambda *xs: np.stack(xs), *dyns)


def take_dynamic(dyn: Dynamic, index) -> Dynamic:
    """Runs ``index`` (an index array) of a stacked Dynamic."""
    return jax.tree.map(lambda v: v[index], dyn)


def placeholder_dynamic(static: Static) -> Dynamic:
    """A Dynamic of the shapes a group's runs have (for jax.eval_shape and lowering)."""
    m, k, d = static.num_classes, static.num_components, static.dim
    task = tasks.make_task(np.full(m, 1.0 / m), np.zeros((m, k, d)), np.ones((m, k, d)))
    return make_dynamic(task)


SHAPE_POINTS = 4096  # output_shapes traces with at most this many evaluation points


@functools.lru_cache(maxsize=256)
def output_shapes(static: Static) -> RunResult:
    """Shapes and dtypes of one run's result, from tracing the real function (nothing runs).

    No result's shape depends on eval.points (only its cost does), so it is traced with at most
    SHAPE_POINTS: a sweep asking for a billion points is refused for its memory
    (``planning.check_sizes``), not stopped by the tracing (whose index arithmetic is int32)."""
    traced = dataclasses.replace(
        static, eval=dataclasses.replace(static.eval, points=min(static.eval.points, SHAPE_POINTS))
    )
    return jax.eval_shape(functools.partial(train_run, traced), placeholder_dynamic(traced))


def make_dynamic(task: tasks.GaussianTask, seed: int = 0, **settings) -> Dynamic:
    """One run's dynamic settings as numpy scalars, by keyword (``DYNAMIC_SETTINGS``; each omitted
    one takes its default); n_data is a count or ONLINE (inf).

    ema_decay and proposal_scale act only in a program compiled with Static(ema=True) and
    Static(importance=True) respectively (sweep.static_of sets both from these values).
    """
    unknown = set(settings) - set(DYNAMIC_SETTINGS)
    if unknown:
        raise TypeError(f"make_dynamic: unknown setting(s) {sorted(unknown)}; known: {', '.join(DYNAMIC_SETTINGS)}")
    values = {name: s.encode(settings.get(name, s.default)) for name, s in DYNAMIC_SETTINGS.items()}
    return Dynamic(task=jax.tree.map(np.asarray, task), seed=np.uint32(seed), **values)
