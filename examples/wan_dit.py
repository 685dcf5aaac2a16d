"""The Wan DiT split over ranks with parallelize_wan: same output as the model on one process.

Uses the embedded tiny checkpoint (Wan2.1's architecture at toy size, random weights), written
once to $LIGHTX2V_SP_CACHE (else ~/.cache/lightx2v_sp) and loaded like a downloaded model.

    torchrun --nproc_per_node 2 examples/wan_dit.py
    python examples/wan_dit.py
"""
import os

import torch
import torch.distributed as dist

from lightx2v_sp.distributed import ParallelDims
from lightx2v_sp.models.tiny import ensure_tiny_model
from lightx2v_sp.models.wan import WanModel, parallelize_wan


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(ulysses_degree=world, cfg_degree=1)

    model = WanModel.from_pretrained(ensure_tiny_model(), dtype=torch.float32)  # or a Wan2.1 directory
    c = model.config
    torch.manual_seed(0)  # the same inputs on every rank
    latents = torch.randn(1, c.in_dim, 3, 8, 8)       # [B, C, F, H, W]: 3 x 4 x 4 = 48 tokens
    timestep = torch.tensor([500.0])                  # [B]
    context = torch.randn(1, c.text_len, c.text_dim)  # [B, L, text_dim], the text encoder's output
    with torch.no_grad():
        reference = model(latents, timestep, context)  # before parallelize: one process does it all

        parallelize_wan(model, dims, a2a="all_to_all", fuse_qkv=True, comm_dtype=None, backend="auto")
        out = model(latents, timestep, context)  # full inputs in, full output out; each rank did its slice
    diff = (out - reference).abs().max().item()
    if dims.rank == 0:
        print(f"WanModel {c.num_layers} blocks, {c.num_heads} heads, ulysses over {world} rank(s): "
              f"output {list(out.shape)}, max |parallel - single| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"rank {dims.rank}: difference {diff:.2e} is above 1e-4")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
