#!/usr/bin/env bash
# One GPU, no torchrun: Wan2.1-T2V-1.3B at 480p (MODEL=1.3b, default) or 14B at 720p with offload (MODEL=14b).
#   MODEL=14b scripts/run_1gpu.sh model.path=/data/Wan2.1-T2V-14B
set -euo pipefail
cd "$(dirname "$0")/.."
case "${MODEL:-1.3b}" in
    1.3b) config=configs/wan_t2v_1.3b_480p.yaml ;;
    14b) config=configs/wan_t2v_14b_720p.yaml ;;
    *) echo "MODEL must be 1.3b or 14b, got '${MODEL}'" >&2; exit 2 ;;
esac
exec python -m lightx2v_sp.generate --config "$config" "$@"
