#!/usr/bin/env bash
# Train on both GPUs of one machine:  ./run_2gpu.sh configs/base.yaml [key=value ...]
# Re-running the same command resumes from the newest checkpoint of the run.
set -euo pipefail
CONFIG=${1:-configs/base.yaml}
shift || true
# One OpenMP thread per process: the DataLoader workers do the CPU work; more threads only contend.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A crashed rank ends the job with an error instead of leaving the other one waiting in a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Consumer cards without NVLink (Titan RTX pairs) sometimes hang in NCCL's first all-reduce when PCIe
# peer-to-peer is blocked by the board (ACS/IOMMU). If that happens, run with NCCL_P2P_DISABLE=1.
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-0}
# Fewer allocator splits with variable-length clips.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec torchrun --standalone --nproc_per_node=2 train.py "$CONFIG" "$@"
