"""Text stage: tokenize the prompt (and the negative prompt), encode with UMT5, free the encoder.

The encoder is laid out over all ranks per `text_encoder.parallel` (replicate | tp | dp, see
models/t5/parallelize.py) and placed per `text_encoder.device` (gpu | cpu | swap). A tp rank
reads only its shard of the weights from disk. Every rank ends with the same contexts:
[1, text_len, d_model] each, zeros after each prompt's last token (Wan's layout).
The encoder is dropped after this stage: one run encodes one prompt pair. So with gpu or swap
its weights are read from the checkpoint straight onto the GPU (no host copy, nothing pinned)
and freed when the stage ends: swap's pinned host copy would only serve a second visit, which a
one-shot run never makes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from lightx2v_sp.config import uses_cfg
from lightx2v_sp.models.t5 import T5Encoder, T5Shard, load_tokenizer, parallelize_t5, tokenize
from lightx2v_sp.models.t5.tokenizer import clean_prompt
from lightx2v_sp.offload import ComponentPlacement

from .checks import agreed
from .loading import load_checked, load_component

log = logging.getLogger("lightx2v_sp")


@dataclass
class TextContexts:
    cond: torch.Tensor                 # [1, L, d_model]
    uncond: Optional[torch.Tensor]     # [1, L, d_model], None without guidance
    num_tokens: list[int]              # real tokens per prompt (incl. </s>), for the summary
    cut_tokens: list[int] = field(default_factory=list)  # tokens beyond text_len dropped, per prompt


def check_text_encoder_layout(te_cfg, device: torch.device, world_size: int) -> None:
    """Combinations that cannot run, caught before any collective."""
    if te_cfg.parallel != "replicate" and te_cfg.device == "cpu" and device.type == "cuda" and world_size > 1:
        raise ValueError(f"text_encoder.parallel={te_cfg.parallel} with text_encoder.device=cpu would run NCCL "
                         "collectives on CPU tensors, which NCCL cannot do; use text_encoder.device=swap "
                         "(GPU only for the text stage) or text_encoder.parallel=replicate")


def cut_tokens(tokenizer, prompts: list[str], text_len: int) -> list[int]:
    """Tokens beyond `text_len` that the encoder will not see, per prompt (warned about, not an error)."""
    names = ["prompt", "negative_prompt"]
    cut = []
    for name, prompt in zip(names, prompts):
        n = len(tokenizer(clean_prompt(prompt), add_special_tokens=True)["input_ids"])
        cut.append(max(0, n - text_len))
        if n > text_len:
            log.warning("warning: %s has %d tokens; text_encoder.text_len=%d keeps the first %d and cuts %d",
                        name, n, text_len, text_len, n - text_len)
    return cut


def load_device(te_cfg, device: torch.device) -> torch.device:
    """Where the weights are read to: the GPU for gpu and swap (the stage runs there and then drops
    them), else the host."""
    if te_cfg.device in ("gpu", "swap") and device.type == "cuda":
        return device
    return torch.device("cpu")


def load_text_encoder(path: str, te_cfg, dtype: torch.dtype, dims, device="cpu") -> T5Encoder:
    """Only this rank's shard for tp; the whole encoder otherwise, tensor by tensor onto `device`."""
    shard = T5Shard(dims.rank, dims.world_size) if te_cfg.parallel == "tp" and dims.world_size > 1 else None
    return T5Encoder.from_pretrained(path, dtype=dtype, device=device, shard=shard,
                                     quant=getattr(te_cfg, "quant", None))  # fp8: quantized as it is read


def encode_prompts(cfg, paths, dims, device: torch.device, dtype: torch.dtype) -> TextContexts:
    te_cfg = cfg.text_encoder
    use_uncond = uses_cfg(cfg.sample)
    prompts = [cfg.prompt] + ([cfg.negative_prompt] if use_uncond else [])
    read_to = load_device(te_cfg, device)

    def load():
        tokenizer = load_component("tokenizer", paths.tokenizer, lambda: load_tokenizer(paths.tokenizer))
        encoder = load_checked("UMT5 text encoder", paths.text_encoder,
                               lambda: load_text_encoder(paths.text_encoder, te_cfg, dtype, dims, read_to))
        ids, mask = tokenize(tokenizer, prompts, te_cfg.text_len)
        cut = cut_tokens(tokenizer, prompts, te_cfg.text_len)
        if int(ids.max()) >= encoder.config.vocab_size:
            raise ValueError(f"the tokenizer at {paths.tokenizer} produced token id {int(ids.max())}, but the text "
                             f"encoder at {paths.text_encoder} has {encoder.config.vocab_size} embeddings; they "
                             "do not belong together")
        return encoder, ids, mask, cut

    encoder, ids, mask, cut = agreed("loading the text encoder", load)
    parallelize_t5(encoder, dims, mode=te_cfg.parallel, symmetric_memory=cfg.comm.symmetric_memory)
    # already where it runs when read to the GPU: "gpu" placement is then a no-op, never a host copy
    mode = "gpu" if read_to.type == "cuda" else te_cfg.device
    placement = ComponentPlacement(encoder, mode, device, name="text_encoder")
    with torch.no_grad(), placement.on_device() as enc:
        run_on = placement.execution_device
        context = enc(ids.to(run_on), mask.to(run_on)).to(device=device, dtype=dtype)
    del placement, encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return TextContexts(cond=context[:1], uncond=context[1:2] if use_uncond else None,
                        num_tokens=[int(n) for n in mask.sum(dim=1)], cut_tokens=cut)
