#!/bin/bash
# Run a sweep as a SLURM job array with your own #SBATCH lines (calibjax submit writes and submits
# such a script for you, with a merge job; see the README). Task K trains shard K: the runs with
# run_id % N == K, into DIR/shards/K-of-N. N is fixed by the first array that runs (its task count;
# calibjax stores it in DIR/manifest.json), so resubmitting any indices later (--array=2, or 0,3)
# trains exactly those shards. Arguments after the sweep file go to calibjax run:
#
#   sbatch --parsable --array=0-7 sweeps/slurm_array.sh sweeps/grid_2000.toml --out results/grid_2000
#   sbatch --dependency=afterany:<jobid> --wrap ".venv/bin/calibjax merge results/grid_2000"
#   .venv/bin/calibjax status results/grid_2000     # what is done; the command for what is missing
#
# Size the resources below for your cluster (a request larger than any node stays PENDING forever):
# calibjax uses one device per CPU and plans its chunks within --mem; about 15k model-steps/s per
# core for the study's model. Command-line options override these lines (sbatch -c 8 --mem=16G ...).
# The early warning (SIGUSR1, 90 s before the time limit) makes calibjax keep its finished chunks and
# requeue the task, which resumes where it stopped; SIGTERM (preemption, scancel) keeps them too.
#SBATCH --job-name=calibjax
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=01:00:00
#SBATCH --output=results/slurm-%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@90
# On a GPU partition (one GPU per task; calibjax then trains on it):
##SBATCH --gres=gpu:1
set -euo pipefail
SWEEP=${1:?usage: sbatch --array=0-N sweeps/slurm_array.sh SWEEP.toml [calibjax run options]}
shift
cd "${SLURM_SUBMIT_DIR:-.}"
test -x .venv/bin/calibjax || { echo "run 'make test' or 'make run' once first to create .venv" >&2; exit 1; }
echo "calibjax: array task ${SLURM_ARRAY_TASK_ID:-}, job ${SLURM_JOB_ID:-}, attempt $((${SLURM_RESTART_COUNT:-0} + 1)), on $(hostname) at $(date -Is)"
exec .venv/bin/calibjax run "$SWEEP" --quiet "$@"
