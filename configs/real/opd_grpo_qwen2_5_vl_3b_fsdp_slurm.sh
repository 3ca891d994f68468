#!/bin/bash
# OPD-GRPO of Qwen2.5-VL-3B under FSDP2 on SLURM: 2 nodes x 8 GPUs (docs/distributed.md).
#
#   sbatch configs/real/opd_grpo_qwen2_5_vl_3b_fsdp_slurm.sh
#   sbatch --nodes 4 configs/real/opd_grpo_qwen2_5_vl_3b_fsdp_slurm.sh      # any node count
#
# srun starts one task per GPU; Lightning reads SLURM_PROCID / SLURM_LOCALID / SLURM_NODELIST itself
# (SLURMEnvironment), so there is no torchrun here. --ntasks-per-node must equal trainer.devices.
# Resubmitting resumes from the last distributed checkpoint (checkpoints/last.ckpt, written every 50 steps);
# a job SLURM stops at its time limit is checkpointed and requeued by Lightning (SIGUSR1, auto-requeue).
#SBATCH --job-name=vold-opd-grpo-3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --output=runs/slurm-%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p runs

# PLACEHOLDER: your environment (module load ..., conda activate ..., or the project's venv).
source .venv/bin/activate

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
export TOKENIZERS_PARALLELISM=false
export NCCL_ASYNC_ERROR_HANDLING=1   # a rank that dies makes the others fail instead of hang
# export HF_HUB_OFFLINE=1            # once the models are in the local cache (compute nodes often lack internet)
# export NCCL_SOCKET_IFNAME=ib0      # the interconnect interface, if NCCL picks the wrong one

CONFIG=configs/real/opd_grpo_qwen2_5_vl_3b_fsdp.yaml
ROOT=runs/opd_grpo_qwen2_5_vl_3b_fsdp   # trainer.default_root_dir
CKPT=()
# A requeued job (SIGUSR1 before the time limit) left hpc_ckpt_N.ckpt in ROOT: Lightning resumes from it by
# itself. Otherwise resume from the last periodic checkpoint (a folder: one shard per rank), if any.
if ! ls -d "$ROOT"/hpc_ckpt_* >/dev/null 2>&1 && [ -e "$ROOT/checkpoints/last.ckpt" ]; then
  CKPT=(--ckpt_path "$ROOT/checkpoints/last.ckpt")
fi

srun --kill-on-bad-exit=1 vold-pl fit --config "$CONFIG" \
  --trainer.num_nodes "$SLURM_NNODES" \
  --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  "${CKPT[@]}"
