#!/bin/bash
# SLURM: one task per node, each starting `accelerate launch` for its node's GPUs.
#   sbatch configs/accelerate/slurm.sh configs/gmai-vl/stage1.yaml
#SBATCH --job-name=medvl
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
STAGE=${1:?usage: sbatch slurm.sh <stage.yaml>}
GPUS_PER_NODE=8
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c "accelerate launch --config_file configs/accelerate/multi-node.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER --main_process_port 29500 \
  --parallelism_config_dp_replicate_size $SLURM_NNODES --parallelism_config_dp_shard_size $GPUS_PER_NODE \
  -m medvl.cli train -c $STAGE --resume"
