#!/bin/bash
# One pass on a GPU machine: throughput (float32 and TF32 matmuls), every shipped sweep run
# unchanged (tables and figures), and the engine and training tests on the GPU.
# Usage: benchmarks/gpu_check.sh OUTDIR   (jax with CUDA, flax, optax, pandas, pyarrow, matplotlib,
# tqdm, pytest, scipy importable by python3; run from the repository root)
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
timeout 150 python3 benchmarks/throughput.py --runs 1 64 256 1024 4096 16384 --steps 500 \
    --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
timeout 40 python3 benchmarks/throughput.py --runs 16384 --steps 500 --precision tensorfloat32 \
    --single-runs 1 --torch-steps 0 > "$OUT/bench_gpu_tf32.txt" 2>&1
# the vectorisation width is part of a run's bits and fixed per backend (1024 on GPU, unmeasured so far)
timeout 90 python3 benchmarks/throughput.py --widths 4096 1024 256 --runs 4096 --steps 500 \
    > "$OUT/widths_gpu.txt" 2>&1
timeout 120 python3 benchmarks/layout_bits.py > "$OUT/layout_bits_gpu.txt" 2>&1
for s in blog atlas dataset_size imbalance multiclass2d noise_floor tail_oversampling estimators losses grid_2000; do
  /usr/bin/time -f "$s wall %e s" timeout 60 python3 -m calibjax run sweeps/$s.toml --out /tmp/res/$s --quiet \
      >> "$OUT/sweeps_gpu.txt" 2>&1
done
python3 benchmarks/blog_numbers.py /tmp/res/blog > "$OUT/blog_numbers.txt" 2>&1 || true
# true calibration on the GPU path (one-hot bin sums, sorts) against the float64 reference
timeout 60 python3 benchmarks/true_calibration_accuracy.py > "$OUT/true_calibration_gpu.txt" 2>&1
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_train.py tests/test_engine.py \
    tests/test_rng.py tests/test_metrics.py tests/test_estimators.py tests/test_losses.py \
    > "$OUT/tests_gpu.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests_gpu.txt"
