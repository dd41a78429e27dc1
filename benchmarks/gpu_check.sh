#!/bin/bash
# One pass on a GPU machine: throughput table, the study's sweep, and the test suite on the GPU.
# Usage: benchmarks/gpu_check.sh OUTDIR   (jax with CUDA, flax, optax, pandas, pyarrow, matplotlib,
# tqdm, pytest, scipy importable by python3; run from the repository root)
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
timeout 240 python3 benchmarks/throughput.py --runs 1 8 64 256 1024 4096 16384 --steps 500 \
    --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
timeout 90 python3 -m calibjax run sweeps/blog.toml --out /tmp/blog_gpu --quiet --no-figures > "$OUT/blog_gpu.txt" 2>&1
python3 - >> "$OUT/blog_gpu.txt" 2>&1 <<'PY'
import pandas as pd
r = pd.read_parquet("/tmp/blog_gpu/runs.parquet"); m = pd.read_parquet("/tmp/blog_gpu/metrics.parquet").merge(r[["run_id", "case"]])
print(m[m.step.isin([100, 1000, 10000])].groupby(["case", "step"])[["kl", "max_err"]].median().to_string())
PY
JAX_PLATFORMS=cuda timeout 230 python3 -m pytest -q -x -p no:cacheprovider --durations=5 > "$OUT/tests_gpu.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests_gpu.txt"
