#!/usr/bin/env bash
# Train on both GPUs of one machine:  ./run_2gpu.sh configs/base.yaml [key=value ...]
# Re-running the same command resumes from the newest checkpoint of the run.
set -euo pipefail
CONFIG=${1:-configs/base.yaml}
shift || true
# One OpenMP thread per process: the DataLoader workers do the CPU work; more threads only contend.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Titan RTX pairs usually have no NVLink: let NCCL pick PCIe/SHM and fail loudly rather than hang.
export NCCL_P2P_LEVEL=${NCCL_P2P_LEVEL:-PHB}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec torchrun --standalone --nproc_per_node=2 train.py "$CONFIG" "$@"
