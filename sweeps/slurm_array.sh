#!/bin/bash
# Run a sweep as a SLURM job array: each task trains a deterministic 1/N of the runs
# (run_id % N == task) into results/<name>/shards/K-of-N; a dependent job merges them.
#
#   sbatch --array=0-7 sweeps/slurm_array.sh sweeps/grid_2000.toml
#   sbatch --dependency=afterok:<jobid> --wrap ".venv/bin/calibjax merge results/grid_2000"
#
# calibjax reads SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT (and SLURM_ARRAY_TASK_MIN) itself,
# so the same line works for any array size. A task that is killed or requeued resumes where it
# stopped: finished chunks are kept, and rerunning the same command trains only what is missing.
#SBATCH --job-name=calibjax
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%A_%a.out
#SBATCH --requeue
set -euo pipefail
SWEEP=${1:?usage: sbatch --array=0-N sweeps/slurm_array.sh SWEEP.toml}
cd "${SLURM_SUBMIT_DIR:-.}"
test -x .venv/bin/calibjax || { echo "run 'make test' or 'make run' once first to create .venv" >&2; exit 1; }
exec .venv/bin/calibjax run "$SWEEP" --quiet
