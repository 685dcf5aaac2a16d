#!/usr/bin/env bash
# torchrun wrapper for `python -m lightx2v_sp.generate`, on one node or several.
#
#   scripts/run_generate.sh CONFIG [key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: the number of visible GPUs, or 2 without GPUs)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's index, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0 (default 29500)
#   OMP_NUM_THREADS CPU threads per process (default: this node's cores / NPROC_PER_NODE, at least 1;
#                   set here so torchrun does not print its warning banner and pick 1 for us)
# Multi-node: run the same command on every node, with NNODES, NODE_RANK and MASTER_ADDR set.
# Ranks are numbered node by node, so Ulysses groups (contiguous ranks) stay inside a node when
# ulysses_degree <= NPROC_PER_NODE, and only the CFG exchange crosses nodes.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [key=value ...]" >&2
    exit 2
fi
config=$1
shift

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
    else
        NPROC_PER_NODE=2
    fi
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
    export OMP_NUM_THREADS
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

cd "$(dirname "$0")/.."
exec torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m lightx2v_sp.generate --config "$config" "$@"
