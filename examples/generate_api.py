"""A whole text-to-video run from Python: the YAML the CLI reads, overrides, and the runner.

    python examples/generate_api.py [key=value ...]
    torchrun --nproc_per_node 2 examples/generate_api.py parallel.ulysses_degree=2

Writes outputs/api.mp4 and outputs/api.json unless output.path is overridden.
"""
import json
import os
import sys

from lightx2v_sp.config import load_config
from lightx2v_sp.distributed import init_distributed, resolve_device, shutdown_distributed
from lightx2v_sp.pipeline import run

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "wan_t2v_tiny.yaml")


def main() -> None:
    # later overrides win: the command line's come after these
    cfg = load_config(CONFIG, ["sample.steps=2", "output.path=outputs/api.mp4", *sys.argv[1:]])
    device = resolve_device(cfg.device)
    init_distributed(device, cfg.comm.timeout_s)  # joins torchrun's job; nothing for one process
    try:
        result = run(cfg, device, progress=False)  # every rank calls it; rank 0 writes the video
    finally:
        shutdown_distributed()
    if result.output_path is not None:  # rank 0
        s = result.summary
        print(f"wrote {result.output_path}: {s['video']['frames']} frames, latents {list(result.latents.shape)}")
        print("layout:", json.dumps({k: s["layout"][k] for k in ("world_size", "ulysses_degree", "cfg_degree",
                                                                   "attention_backend")}))
        print("stage seconds:", json.dumps(s["stage_times_s"]))


if __name__ == "__main__":
    main()
