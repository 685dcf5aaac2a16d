#!/usr/bin/env bash
# The embedded tiny model on CPU with 2 processes (Ulysses over 2 ranks by default): a real mp4
# in outputs/tiny.mp4 (+ outputs/tiny.json) in well under a minute. Its video is noise.
#   scripts/run_tiny.sh [key=value ...]     e.g. scripts/run_tiny.sh parallel.ulysses_degree=1 parallel.cfg_degree=2
set -euo pipefail
here=$(dirname "$0")
NPROC_PER_NODE=${NPROC_PER_NODE:-2} exec "$here/run_generate.sh" configs/wan_t2v_tiny.yaml \
    device=cpu "parallel.ulysses_degree=${NPROC_PER_NODE:-2}" "$@"
