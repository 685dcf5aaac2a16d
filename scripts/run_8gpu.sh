#!/usr/bin/env bash
# 8 NVLink GPUs of one node: Wan2.1-T2V-1.3B at 480p (MODEL=1.3b, default) or 14B at 720p (MODEL=14b),
# cfg 2 x ulysses 4. Multi-node: set NNODES / NODE_RANK / MASTER_ADDR (see run_generate.sh) and
# pass the layout, e.g. NNODES=2 ... scripts/run_8gpu.sh parallel.cfg_degree=2 parallel.ulysses_degree=8
set -euo pipefail
here=$(dirname "$0")
case "${MODEL:-1.3b}" in
    1.3b) config=configs/wan_t2v_1.3b_480p_8gpu.yaml ;;
    14b) config=configs/wan_t2v_14b_720p_8gpu.yaml ;;
    *) echo "MODEL must be 1.3b or 14b, got '${MODEL}'" >&2; exit 2 ;;
esac
NPROC_PER_NODE=${NPROC_PER_NODE:-8} exec "$here/run_generate.sh" "$config" "$@"
