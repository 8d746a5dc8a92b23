#!/bin/bash
# The OpenVLThinker loop on a SLURM allocation:
#     sbatch launchers/iterate.sh [CONFIG] [key=value ...]
#     sbatch --nodes=4 launchers/iterate.sh configs/iterate/openvlthinker_7b.yaml iterate.nnodes_grpo=4
# This script runs the orchestrator once, on the batch host. Each stage is then started with
#     srun --nodes=N --nodelist=<first N hosts> python -m torch.distributed.run
#          --nnodes=N --nproc-per-node=P --rdzv-backend=c10d --rdzv-endpoint=<first host>:PORT ...
# with N/P from iterate.nnodes_<stage>/nproc_<stage> (so stages use different node counts) and
# its log in runs/<name>/<stage>/stage.log. `--resume` is always passed: a requeued or resubmitted
# job continues at the first unfinished stage.
#SBATCH --job-name=ovlt-iterate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=ovlt-iterate-%j.out
set -euo pipefail

CONFIG="${1:-configs/iterate/openvlthinker_7b.yaml}"
shift $(( $# > 0 ? 1 : 0 ))

# sbatch copies the script to a spool dir; the submit dir is the repository.
cd "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${OVLT_PYTHON:-python}"

: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (use sbatch)}"
echo "ovlt iterate: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST} (${SLURM_NNODES:-?} nodes), config ${CONFIG}"

# NCCL over the cluster fabric; users override by exporting before sbatch.
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

exec "$PYTHON" launchers/iterate.py --config "$CONFIG" --launcher slurm --resume "$@"
