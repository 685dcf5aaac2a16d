"""The UMT5 text encoder split over ranks: tensor-parallel (each rank holds 1/N of the weights) or
data-parallel (each rank encodes some of the prompts); every rank gets the full result.

    torchrun --nproc_per_node 2 examples/t5_encoder.py
    python examples/t5_encoder.py

Uses the embedded tiny checkpoint's encoder and tokenizer (random weights, real layouts).
"""
import os

import torch
import torch.distributed as dist

from lightx2v_sp.distributed import ParallelDims
from lightx2v_sp.models.t5 import T5Encoder, load_tokenizer, parallelize_t5, tokenize
from lightx2v_sp.models.tiny import ensure_tiny_model


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(ulysses_degree=world, cfg_degree=1)

    path = ensure_tiny_model()  # a Wan2.1 download works the same: models_t5_*.pth or text_encoder/
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    input_ids, attention_mask = tokenize(tokenizer, ["A tiny cat walks on the grass.", "blurry, low quality"],
                                         text_len=32)  # [2, 32] each
    with torch.no_grad():
        reference = T5Encoder.from_pretrained(os.path.join(path, "text_encoder"))(input_ids, attention_mask)
        for mode in ("tp", "dp"):
            enc = parallelize_t5(T5Encoder.from_pretrained(os.path.join(path, "text_encoder")), dims, mode=mode)
            hidden = enc(input_ids, attention_mask)  # [2, 32, d_model] on every rank
            real = attention_mask.bool()  # compare the prompts' tokens; padding rows are not used downstream
            diff = (hidden[real] - reference[real]).abs().max().item()
            if dims.rank == 0:
                print(f"UMT5 mode={mode} over {world} rank(s): hidden {list(hidden.shape)}, "
                      f"max |parallel - single| = {diff:.2e}")
            if diff > 1e-4:
                raise SystemExit(f"rank {dims.rank}: difference {diff:.2e} is above 1e-4")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
