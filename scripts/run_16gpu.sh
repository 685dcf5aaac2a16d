#!/usr/bin/env bash
# 16 GPUs on two nodes of 8: Wan2.1-T2V-1.3B at 480p (MODEL=1.3b, default: cfg 2 x ulysses 4 x ring 2)
# or 14B at 720p (MODEL=14b: ulysses 8 x ring 2, the ring across the nodes). Run the same command on
# both nodes, with this node's index and node 0's address (reachable from node 1):
#   node 0:  NODE_RANK=0 MASTER_ADDR=node0 scripts/run_16gpu.sh [key=value ...]
#   node 1:  NODE_RANK=1 MASTER_ADDR=node0 scripts/run_16gpu.sh [key=value ...]
# Ranks 0-7 are on node 0 and 8-15 on node 1 (torchrun numbers them node by node), which is what the
# layouts assume: Ulysses on consecutive ranks, inside a node. Both nodes need the model (download it
# first, see the README) and the same code and config.
set -euo pipefail
here=$(dirname "$0")
case "${MODEL:-1.3b}" in
    1.3b) config=configs/wan_t2v_1.3b_480p_16gpu.yaml ;;
    14b) config=configs/wan_t2v_14b_720p_16gpu.yaml ;;
    *) echo "MODEL must be 1.3b or 14b, got '${MODEL}'" >&2; exit 2 ;;
esac
if [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
    echo "set NODE_RANK (0 or 1) and MASTER_ADDR (node 0's address) on both nodes" >&2
    exit 2
fi
NNODES=${NNODES:-2} NPROC_PER_NODE=${NPROC_PER_NODE:-8} exec "$here/run_generate.sh" "$config" "$@"
