#!/usr/bin/env bash
# Train on several machines ("nodes"): run this same command on every node, each with the same settings.
#
#   NNODES=2 RDZV_ENDPOINT=node01:29400 RDZV_ID=myrun ./run_multinode.sh configs/base.yaml [key=value ...]
#
# The launchers meet at a c10d rendezvous: one of them (the one on the RDZV_ENDPOINT host) serves it, the others
# connect to it, and together they number the processes 0 .. NNODES x NPROC_PER_NODE - 1. No node rank is needed;
# which node gets global rank 0 (the one that writes the checkpoints, logs and config.yaml) is the rendezvous's
# choice. run.dir and the data must therefore live on a file system every node sees (NFS, Lustre, ...): each rank
# resumes from that directory. slurm/train.sbatch runs this script once per node under SLURM.
#
# Settings (environment variables):
#   NNODES          number of nodes (required)
#   RDZV_ENDPOINT   host:port of the rendezvous, on one of the nodes and reachable from all (required)
#   RDZV_ID         a name shared by the nodes of this run, different for runs that share an endpoint (required)
#   NPROC_PER_NODE  processes (GPUs) per node; default: the GPUs this node sees, or 1 without a GPU
#   LOCAL_ADDR      this node's address as the others reach it; default: the host's fully qualified name. Set it
#                   when that name resolves to an interface the other nodes cannot reach
#   PYTHON          the Python of the project's environment (default: python); `-m torch.distributed.run` is torchrun
#
# Re-running the same command on every node resumes from the newest checkpoint of the run. SIGTERM to the launchers
# (a scheduler's warning before the time limit) makes every rank finish its step and save; the launcher waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default: 30) before killing its workers: set it above the time
# of one optimizer step plus one checkpoint save.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous (on one node, reachable from every node)}"
: "${RDZV_ID:?set RDZV_ID, one name for this run on every node}"
PYTHON=${PYTHON:-python}
CONFIG=${1:?usage: NNODES=.. RDZV_ENDPOINT=.. RDZV_ID=.. ./run_multinode.sh CONFIG [key=value ...]}
shift
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

# One OpenMP thread per process: the DataLoader workers do the CPU work; more threads only contend.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A crashed rank ends the job with an error instead of leaving the others waiting in a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Fewer allocator splits with variable-length clips.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# The network between nodes: NCCL (GPUs) and gloo (CPU) pick an interface themselves and sometimes pick one the
# other nodes cannot reach (a docker bridge, a management network). Name the right one, as `ip -brief addr`
# lists it, e.g.  export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0  (or eth0, ens3, ...). Without
# InfiniBand, or when NCCL's first all-reduce hangs across nodes, try NCCL_IB_DISABLE=1.

local_addr=()
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    local_addr=(--local-addr "$LOCAL_ADDR")
fi
# exec: the launcher itself receives the scheduler's signals and forwards them to its workers.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" ${local_addr[@]+"${local_addr[@]}"} \
    "$HERE/train.py" "$CONFIG" "$@"
