#!/usr/bin/env bash
# 8 RTX 4090 (PCIe, no peer-to-peer): round_robin + fp8 Ulysses, tensor-parallel UMT5, and for the
# 14B model the DiT in FP8, resident (configs/wan_t2v_14b_720p_4090x8_offload.yaml: bf16 + block offload). MODEL=1.3b (default, 480p) or MODEL=14b (720p).
# NCCL_P2P_DISABLE=1: consumer cards have no peer-to-peer; say so instead of letting NCCL probe it.
set -euo pipefail
here=$(dirname "$0")
case "${MODEL:-1.3b}" in
    1.3b) config=configs/wan_t2v_1.3b_480p_4090x8.yaml ;;
    14b) config=configs/wan_t2v_14b_720p_4090x8.yaml ;;
    *) echo "MODEL must be 1.3b or 14b, got '${MODEL}'" >&2; exit 2 ;;
esac
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8} exec "$here/run_generate.sh" "$config" "$@"
