"""Throughput of one calibjax source tree, for comparing two versions side by side.

    for i in 1 2 3; do
        PYTHONPATH=/path/to/old python benchmarks/tree_ab.py
        PYTHONPATH=/path/to/new python benchmarks/tree_ab.py
    done

Prints model-steps/s (best of 3) for 64 runs of example 3 on one device: "train" (2000 steps, 2
checkpoints: the step loop) and "eval" (1000 steps, 7 checkpoints: evaluation weighs in). Uses only
the API both 0.3.0 and later have. Alternate the trees: this machine drifts 20 % within minutes.
"""

import json
import time

import calibjax

calibjax.setup(cpu_devices=1)
import jax  # noqa: E402

try:  # 0.10.0 on: the core's modules in calibjax.core
    from calibjax.core import tasks, train  # noqa: E402
except ImportError:  # earlier versions
    from calibjax import tasks, train  # noqa: E402

task = tasks.make_task([0.5, 0.5], [[[0.0]], [[3.0]]], [[[2.0]], [[1.0]]])
R = 64
out = {}
for label, steps, ck in (("train", 2000, (1000, 2000)), ("eval", 1000, (10, 20, 50, 100, 200, 500, 1000))):
    st = train.Static(steps=steps, checkpoints=ck)
    fn = train.batched_train_fn(st, 8)
    dyn = train.stack_dynamic([train.make_dynamic(task, n_data=100_000, seed=s) for s in range(R)])
    jax.block_until_ready(fn(dyn))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(dyn))
        times.append(time.perf_counter() - t0)
    out[label] = R * steps / min(times)
print(json.dumps(out))
