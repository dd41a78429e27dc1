"""calibjax's CPU kernel (cpu_kernel, csrc/dense.cc) against numpy and XLA, and its fallback.

Numbers: the kernel's products are checked against float64 numpy (to float32 rounding) on random
shapes, odd sizes included, and its gradients against XLA's; its bits against themselves across
batch compositions, tile edges, vmap and devices (each element is one fma chain in k order).
"""

import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.core import kernel, losses, train
from calibjax.core.model import MLP
from calibjax.execution import kernel_loader, planning, runtime

from conftest import SMALL, example, lowered_isa_env, python_in

pytestmark = pytest.mark.skipif(not kernel_loader.available(), reason="the CPU kernel cannot be built or run here")

MODES = [(False, False), (False, True), (True, False)]  # forward, input gradient, weight gradient


def operands(rng, batch, m, k, n, trans_a, trans_b):
    a = rng.standard_normal((*batch, k, m) if trans_a else (*batch, m, k)).astype(np.float32)
    b = rng.standard_normal((*batch, n, k) if trans_b else (*batch, k, n)).astype(np.float32)
    return a, b


def reference(a, b, trans_a, trans_b):
    """float64 op(a) @ op(b), and the bound on a float32 sum of k products: k eps (|op(a)| @ |op(b)|)."""
    a, b = (np.swapaxes(a, -1, -2) if trans_a else a), (np.swapaxes(b, -1, -2) if trans_b else b)
    a, b = a.astype(np.float64), b.astype(np.float64)
    return a @ b, a.shape[-1] * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(b))


@pytest.mark.parametrize("trans_a,trans_b", MODES)
@pytest.mark.parametrize(
    "batch,m,k,n",
    [
        ((), 64, 64, 64),
        ((8,), 64, 64, 64),
        ((3,), 7, 5, 9),
        ((2, 3), 13, 70, 17),
        ((5,), 1, 1, 1),
        ((4,), 65, 33, 24),
        ((1,), 300, 64, 64),
        ((2,), 6, 3, 31),
        ((3,), 70, 64, 2),
        ((2,), 9, 13, 5),
        ((2,), 33, 2, 64),
    ],
)  # thin ones
def test_products_match_float64_numpy_to_float32_rounding(batch, m, k, n, trans_a, trans_b):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a, b = operands(rng, batch, m, k, n, trans_a, trans_b)
    got = np.asarray(jax.jit(functools.partial(kernel.batched_matmul, trans_a=trans_a, trans_b=trans_b))(a, b))
    want, bound = reference(a, b, trans_a, trans_b)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    xla = np.asarray(
        jnp.matmul(*(np.swapaxes(x, -1, -2) if t else x for x, t in ((a, trans_a), (b, trans_b))), precision="highest")
    )
    assert np.all(np.abs(got - xla) <= 2 * bound)  # and so XLA's dot, to the same rounding


@pytest.mark.parametrize("trans_a,trans_b", MODES)
def test_a_products_bits_do_not_depend_on_its_batch_mates_position_or_tile(trans_a, trans_b):
    """Each element is one fma chain over k in order, whatever the batch, the batch size, the
    element's place in it, or which tile (full 6 x 16, an edge tile, a scalar column) computes it."""
    rng = np.random.default_rng(1)
    a, b = operands(rng, (9,), 64, 64, 64, trans_a, trans_b)
    mm = jax.jit(functools.partial(kernel.batched_matmul, trans_a=trans_a, trans_b=trans_b))
    whole = np.asarray(mm(a, b))
    for s in (0, 4, 8):
        assert np.array_equal(np.asarray(mm(a[s : s + 1], b[s : s + 1])), whole[s : s + 1])
    assert np.array_equal(np.asarray(mm(a[::-1], b[::-1]))[::-1], whole)  # other positions, other mates
    # Rows 0..6 and columns 0..20 alone (edge tiles of 1-5 rows, 8-wide and scalar columns) are the
    # same bits as in the 64 x 64 product computed by full tiles.
    rows = a[:, :, :7] if trans_a else a[:, :7]
    cols = b[:, :21] if trans_b else b[:, :, :21]
    assert np.array_equal(np.asarray(mm(rows, cols)), whole[:, :7, :21])


def test_dense_gradients_match_xlas_and_vmap_is_one_batched_call():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 32, 24)), jnp.float32)  # 5 runs, batch 32, 24 -> 40
    w = jnp.asarray(rng.standard_normal((5, 24, 40)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((5, 32, 40)), jnp.float32)

    def loss(product, x, w, t):
        return jnp.sum(jnp.tanh(product(x, w)) * t)

    grad = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, kernel.dense), argnums=(0, 1))))
    ref = jax.jit(
        jax.vmap(
            jax.value_and_grad(
                functools.partial(loss, lambda x, w: jnp.matmul(x, w, precision="highest")), argnums=(0, 1)
            )
        )
    )
    (v, (gx, gw)), (rv, (rgx, rgw)) = grad(x, w, t), ref(x, w, t)
    for got, want in ((v, rv), (gx, rgx), (gw, rgw)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # Under vmap the three products are three kernel calls for all runs (broadcast_all), not a loop.
    hlo = grad.lower(x, w, t).as_text()
    assert hlo.count(kernel.TARGET) == 3 and "while" not in hlo
    # A single run's gradient through the kernel is the same bits as the same run inside the batch.
    one = jax.jit(jax.value_and_grad(functools.partial(loss, kernel.dense), argnums=(0, 1)))(x[3], w[3], t[3])
    assert np.array_equal(np.asarray(one[1][1]), np.asarray(gw[3]))


def test_every_float32_layer_thin_ones_too_goes_through_the_kernel_and_other_dtypes_to_xla():
    """No product of the model is left to XLA's dot, whose summation order follows the CPU model."""
    x = jnp.ones((4, 64))
    for w in (jnp.ones((64, 2)), jnp.ones((64, 64))):
        assert kernel.TARGET in jax.jit(kernel.dense).lower(x, w).as_text()
    assert kernel.TARGET in jax.jit(kernel.dense).lower(jnp.ones((4, 1)), jnp.ones((1, 64))).as_text()
    half = jnp.ones((4, 64), jnp.bfloat16)
    assert kernel.TARGET not in jax.jit(kernel.dense).lower(half, half.T @ half).as_text()


def test_sharded_over_devices_each_device_calls_its_own_products():
    devices = jax.devices()[:4]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("runs",))
    spec = jax.sharding.PartitionSpec("runs")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 16, 64)).astype(np.float32)
    w = rng.standard_normal((8, 64, 64)).astype(np.float32)
    grads = jax.vmap(jax.grad(lambda x, w: jnp.sum(kernel.dense(x, w) ** 2), argnums=1))
    sharded = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    assert np.array_equal(np.asarray(sharded(x, w)), np.asarray(jax.jit(grads)(x, w)))


def model_loss(model, params, x, c, weight):
    loss = losses.loss_values("cross_entropy", model.apply(params, x), c, 0.0, 0.0)
    return (loss if weight is None else weight * loss).mean()


@pytest.mark.parametrize(
    "hidden,classes,dim,batch", [((64, 64), 2, 1, 64), ((24, 7), 3, 2, 13), ((5,), 2, 1, 32), ((16, 16, 16), 4, 3, 8)]
)
@pytest.mark.parametrize("weighted", [False, True])
def test_the_fused_step_gives_autodiffs_loss_and_gradients(hidden, classes, dim, batch, weighted):
    """kernel.loss_and_grads (the whole forward and backward pass in C++) against
    jax.value_and_grad of the same flax model in XLA, float32 rounding apart; narrow layers
    (5 and 7 wide, the logits) included."""
    model = MLP(hidden, classes)
    rng = np.random.default_rng(len(hidden) * 100 + classes)
    params = model.init(jax.random.key(batch), jnp.zeros((dim,)))
    x = jnp.asarray(rng.standard_normal((batch, dim)), jnp.float32)
    c = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
    weight = jnp.asarray(rng.uniform(0.2, 3.0, batch), jnp.float32) if weighted else None
    want_loss, want = jax.value_and_grad(functools.partial(model_loss, model))(params, x, c, weight)
    got_loss, got = jax.jit(kernel.loss_and_grads)(params, x, c, weight)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * float(np.max(np.abs(w))))


def test_the_fused_step_of_a_run_is_the_same_bits_alone_and_in_any_batch():
    model = MLP((64, 64), 2)
    keys = jax.random.split(jax.random.key(7), 6)
    params = jax.vmap(lambda k: model.init(k, jnp.zeros((1,))))(keys)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((6, 64, 1)), jnp.float32)
    c = jnp.asarray(rng.integers(0, 2, (6, 64)), jnp.int32)
    step = jax.jit(jax.vmap(lambda p, x, c: kernel.loss_and_grads(p, x, c, None)))
    whole = step(params, x, c)
    part = step(*jax.tree.map(lambda v: v[3:5], (params, x, c)))
    alone = jax.jit(kernel.loss_and_grads)(*jax.tree.map(lambda v: v[4], (params, x, c)), None)
    for w, p, a in zip(jax.tree.leaves(whole), jax.tree.leaves(part), jax.tree.leaves(alone), strict=True):
        assert np.array_equal(np.asarray(w)[3:5], np.asarray(p)) and np.array_equal(np.asarray(w)[4], np.asarray(a))


def test_the_fused_step_lets_nan_through_so_divergence_is_seen():
    model = MLP((16, 16), 2)
    params = model.init(jax.random.key(0), jnp.zeros((1,)))
    params["params"]["TorchDense_1"]["kernel"] = params["params"]["TorchDense_1"]["kernel"].at[0, 0].set(jnp.nan)
    loss, grads = jax.jit(kernel.loss_and_grads)(params, jnp.ones((8, 1)), jnp.zeros(8, jnp.int32), None)
    assert np.isnan(float(loss)) and np.isnan(np.asarray(grads["params"]["TorchDense_2"]["kernel"])).any()


def test_which_steps_are_fused():
    assert kernel.fuses("relu", "cross_entropy")
    assert not kernel.fuses("tanh", "cross_entropy") and not kernel.fuses("relu", "focal")
    dyns = train.stack_dynamic([train.make_dynamic(example(1), seed=s) for s in range(2)])
    for changes, fused in (({}, True), ({"activation": "tanh"}, False), ({"loss": "brier"}, False)):
        static = dataclasses.replace(SMALL, dense="kernel", **changes)
        hlo = train.batched_train_fn(static, 2).lower(dyns).as_text()
        assert (kernel.STEP_TARGET in hlo) == fused
        assert kernel.TARGET in hlo  # the 16 x 16 layer's products elsewhere (evaluation, or the step)


@pytest.mark.slow
def test_the_study_model_trains_through_the_kernel_like_through_xla():
    """The same runs with either path: losses and KL within training noise of each other (they are
    different floats, so not bit-equal); the kernel's program trains by the fused step."""
    static = dataclasses.replace(SMALL, hidden=(64, 64), steps=300, checkpoints=(300,))
    dyns = train.stack_dynamic([train.make_dynamic(example(1), lr=1e-2, n_data=2000, seed=s) for s in range(4)])
    out = {d: train.batched_train_fn(dataclasses.replace(static, dense=d), 2)(dyns) for d in ("kernel", "xla")}
    k, x = out["kernel"].checkpoints.scalars, out["xla"].checkpoints.scalars
    np.testing.assert_allclose(np.asarray(k.loss), np.asarray(x.loss), rtol=0.05)
    np.testing.assert_allclose(np.asarray(k.kl), np.asarray(x.kl), rtol=0.5, atol=2e-3)
    # It learned: the posterior error is a small part of the priors-only classifier's (I(C; X)).
    assert np.all(np.asarray(k.kl)[:, 0] < 0.1 * np.asarray(out["kernel"].mutual_info))
    hlo = train.batched_train_fn(dataclasses.replace(static, dense="kernel"), 2).lower(dyns).as_text()
    assert kernel.STEP_TARGET in hlo  # the training step in one call


def test_the_run_identity_does_not_include_the_product_path():
    from calibjax import sweep

    assert sweep.static_json(SMALL) == sweep.static_json(dataclasses.replace(SMALL, dense="kernel"))


def test_resolve_and_dense_choice(monkeypatch):
    assert kernel_loader.resolve("kernel", "cpu") == "kernel" and kernel_loader.resolve("auto", "cpu") == "kernel"
    assert kernel_loader.resolve("xla", "cpu") == "xla" and kernel_loader.resolve("auto", "gpu") == "xla"
    with pytest.raises(kernel_loader.KernelError, match="CPU only"):
        kernel_loader.resolve("kernel", "gpu")
    with pytest.raises(
        kernel_loader.KernelError, match="CALIBJAX_DENSE: expected one of auto, kernel, xla, got 'fast'"
    ):
        kernel_loader.resolve("fast", "cpu")
    monkeypatch.delenv("CALIBJAX_DENSE", raising=False)
    assert planning.dense_choice(None) == planning.DEFAULT_DENSE == "auto"
    assert planning.dense_choice(None, {"backend": "cpu", "dense": "kernel"}) == "kernel"  # resume keeps it
    assert planning.dense_choice(None, {"backend": "cpu"}) == "xla"  # written before the kernel existed
    assert planning.dense_choice(None, {"backend": "gpu", "dense": "kernel"}) == "auto"
    assert planning.dense_choice("xla", {"backend": "cpu", "dense": "kernel"}) == "xla"  # the flag decides
    monkeypatch.setenv("CALIBJAX_DENSE", "kernel")
    assert planning.dense_choice(None, {"backend": "cpu", "dense": "xla"}) == "kernel"


@pytest.mark.slow
def test_without_a_compiler_auto_falls_back_once_and_kernel_is_an_error(tmp_path):
    """In a fresh process with no usable compiler: auto says why once and uses XLA; --dense kernel
    stops with one line before anything is trained."""
    code = (
        "import sys; from calibjax.execution import kernel_loader as k\n"
        "print(k.resolve('auto', 'cpu'), k.resolve('auto', 'cpu'))\n"
        "try: k.resolve('kernel', 'cpu')\nexcept k.KernelError as e: print('error:', e)\n"
    )
    env = {
        "CXX": str(tmp_path / "no-such-compiler"),
        "CALIBJAX_KERNEL_CACHE": str(tmp_path / "cache"),
        "PATH": "/usr/bin:/bin",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "xla xla"
    assert "error: the calibjax CPU kernel is unavailable: compiling dense.cc failed" in out.stdout
    assert out.stderr.count("the CPU kernel is unavailable") == 1
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def test_the_build_is_cached_by_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBJAX_KERNEL_CACHE", str(tmp_path))
    lib = kernel_loader.build()
    assert lib.parent == tmp_path and lib.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lib.name, f"{lib.name}.sha256"]
    assert kernel_loader.build() == lib and lib.stat().st_mtime_ns == kernel_loader.build().stat().st_mtime_ns
    monkeypatch.setitem(kernel_loader.VARIANTS, "avx2", (*kernel_loader.FLAGS, "-DCALIBJAX_TEST"))
    assert kernel_loader.library_path(kernel_loader.compiler()) != lib  # other flags: another build
    assert kernel_loader.library_path(kernel_loader.compiler(), "avx512").name.startswith("calibjax_dense-avx512-")


def test_a_damaged_cached_build_is_rebuilt_not_loaded(tmp_path):
    """A truncated library in the kernel cache (a full disk, a copy cut short) once crashed every
    run with SIGBUS when loaded: its SHA-256 no longer matches the one recorded at build, so it is
    rebuilt, with one line saying so, and the run goes on."""
    env = {"CALIBJAX_KERNEL_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    code = "from calibjax.execution import kernel_loader as k; k.require(); print(k.loaded_variant())"
    first = python_in(code, env=env)
    assert first.returncode == 0, first.stderr
    (lib,) = tmp_path.glob("*.so")
    built = lib.read_bytes()
    lib.write_bytes(built[: len(built) // 3])
    again = python_in(code, env=env)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    assert "cannot be trusted (its SHA-256 differs from the one recorded at build); rebuilding it" in again.stderr
    assert kernel_loader.damage(lib) is None and lib.stat().st_size == len(built)


def test_on_a_cpu_without_avx2_auto_falls_back_once_and_kernel_is_an_error():
    """A CPU without AVX2/FMA (an older x86 or, by the same path, another architecture), simulated by
    capping the instruction set: nothing is compiled, auto says why once, kernel is refused."""
    code = (
        "from calibjax.execution import kernel_loader as k\n"
        "print(k.resolve('auto', 'cpu'), k.resolve('auto', 'cpu'))\n"
        "try: k.resolve('kernel', 'cpu')\nexcept k.KernelError as e: print('error:', e)\n"
    )
    out = python_in(code, env=lowered_isa_env("sse4.2"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "xla xla",
        "error: the calibjax CPU kernel is unavailable: it needs AVX2 and "
        "FMA, and this CPU computes with sse4.2 (--xla_cpu_max_isa)",
    ]
    assert out.stderr.count("the CPU kernel is unavailable") == 1 and "built the CPU kernel" not in out.stderr


VARIANT_DIGEST = """
import hashlib, functools, jax, jax.numpy as jnp, numpy as np
from calibjax.core import kernel
from calibjax.execution import kernel_loader
from calibjax.core.model import MLP
kernel_loader.require()  # build, load and register the kernel with XLA
rng, parts = np.random.default_rng(7), []
for m, k, n in [(64, 64, 64), (67, 33, 70), (8, 5, 32), (9, 64, 95), (300, 64, 64), (7, 3, 33)]:
    for ta, tb in [(False, False), (False, True), (True, False)]:
        a = rng.standard_normal((3, k, m) if ta else (3, m, k)).astype(np.float32)
        b = rng.standard_normal((3, n, k) if tb else (3, k, n)).astype(np.float32)
        f = jax.jit(functools.partial(kernel.batched_matmul, trans_a=ta, trans_b=tb))
        parts.append(np.asarray(f(a, b)))
for hidden, classes, dim, batch in [((64, 64), 2, 1, 64), ((40, 17), 5, 3, 33)]:
    params = MLP(hidden=hidden, num_classes=classes).init(jax.random.key(1), jnp.zeros((1, dim)))
    x = rng.standard_normal((batch, dim)).astype(np.float32)
    c = rng.integers(0, classes, batch).astype(np.int32)
    loss, grads = jax.jit(kernel.loss_and_grads)(params, x, c, None)
    parts += [np.asarray(loss)] + [np.asarray(g) for g in jax.tree.leaves(grads)]
print(kernel_loader.loaded_variant(), hashlib.sha256(b"".join(p.tobytes() for p in parts)).hexdigest())
"""


@pytest.mark.skipif(runtime.cpu_isa() != "avx512", reason="the avx512 variant needs a CPU with AVX-512")
def test_the_avx512_variant_gives_the_avx2_variants_bits():
    wide, narrow = python_in(VARIANT_DIGEST), python_in(VARIANT_DIGEST, env=lowered_isa_env("avx2"))
    assert wide.returncode == narrow.returncode == 0, wide.stderr + narrow.stderr
    (v1, d1), (v2, d2) = wide.stdout.split(), narrow.stdout.split()
    assert (v1, v2) == ("avx512", "avx2") and d1 == d2
