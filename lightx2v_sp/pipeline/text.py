"""Text stage: tokenize the prompt (and the negative prompt), encode with UMT5, free the encoder.

The encoder is laid out over all ranks per `text_encoder.parallel` (replicate | tp | dp, see
models/t5/parallelize.py) and placed per `text_encoder.device` (gpu | cpu | swap). A tp rank
reads only its shard of the weights from disk. Every rank ends with the same contexts:
[1, text_len, d_model] each, zeros after each prompt's last token (Wan's layout).
`encode_prompts` loads, encodes one prompt pair and drops the encoder (one run, one pair): so with
gpu or swap its weights are read from the checkpoint straight onto the GPU (no host copy, nothing
pinned) and freed when the stage ends, since swap's pinned host copy would only serve a second visit,
which a one-shot run never makes. `PromptEncoder(keep=True)` keeps it loaded for many jobs (serve/:
the server and `generate --prompts`), where swap does mean pinned host memory visiting the GPU per job.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from lightx2v_sp.models.t5 import T5Encoder, T5Shard, load_tokenizer, parallelize_t5, tokenize
from lightx2v_sp.models.t5.tokenizer import token_count
from lightx2v_sp.offload import ComponentPlacement

from .checks import agreed
from .loading import load_checked, load_component
from .prompt_cache import prompt_pair

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
        n = token_count(tokenizer, prompt)
        cut.append(max(0, n - text_len))
        if n > text_len:
            log.warning("warning: %s has %d tokens; text_encoder.text_len=%d keeps the first %d and cuts %d",
                        name, n, text_len, text_len, n - text_len)
    return cut


def load_device(te_cfg, device: torch.device, keep: bool = False) -> torch.device:
    """Where the weights are read to: the GPU for gpu, and for swap when the encoder serves one stage
    and is dropped (`keep` False); else the host (cpu, or swap's pinned copy that visits the GPU)."""
    if device.type == "cuda" and (te_cfg.device == "gpu" or (te_cfg.device == "swap" and not keep)):
        return device
    return torch.device("cpu")


def load_text_encoder(path: str, te_cfg, dtype: torch.dtype, dims, device="cpu") -> T5Encoder:
    """Only this rank's shard for tp; the whole encoder otherwise, tensor by tensor onto `device`."""
    shard = T5Shard(dims.rank, dims.world_size) if te_cfg.parallel == "tp" and dims.world_size > 1 else None
    return T5Encoder.from_pretrained(path, dtype=dtype, device=device, shard=shard,
                                     quant=getattr(te_cfg, "quant", None))  # fp8: quantized as it is read


class PromptEncoder:
    """The tokenizer and the laid-out, placed encoder, loaded once; `encode` per prompt pair.
    `keep`: it serves many jobs (swap then keeps a pinned host copy between them)."""

    def __init__(self, cfg, paths, dims, device: torch.device, dtype: torch.dtype, keep: bool = False):
        te_cfg = self.te_cfg = cfg.text_encoder
        self.paths, self.device, self.dtype = paths, device, dtype
        read_to = load_device(te_cfg, device, keep)

        def load():
            tokenizer = load_component("tokenizer", paths.tokenizer, lambda: load_tokenizer(paths.tokenizer))
            encoder = load_checked("UMT5 text encoder", paths.text_encoder,
                                   lambda: load_text_encoder(paths.text_encoder, te_cfg, dtype, dims, read_to))
            return tokenizer, encoder

        self.tokenizer, encoder = agreed("loading the text encoder", load)
        parallelize_t5(encoder, dims, mode=te_cfg.parallel, symmetric_memory=cfg.comm.symmetric_memory)
        # already where it runs when read to the GPU: "gpu" placement is then a no-op, never a host copy
        mode = "gpu" if read_to.type == "cuda" else te_cfg.device
        self.placement = ComponentPlacement(encoder, mode, device, name="text_encoder")

    def encode(self, prompt: str, negative_prompt: Optional[str]) -> TextContexts:
        """Contexts of `prompt` (and of `negative_prompt` unless None: no guidance) on every rank."""
        prompts = [prompt] + ([negative_prompt] if negative_prompt is not None else [])
        text_len, vocab = self.te_cfg.text_len, self.placement.module.config.vocab_size

        def tokens():
            ids, mask = tokenize(self.tokenizer, prompts, text_len)
            cut = cut_tokens(self.tokenizer, prompts, text_len)
            if int(ids.max()) >= vocab:
                raise ValueError(f"the tokenizer at {self.paths.tokenizer} produced token id {int(ids.max())}, but "
                                 f"the text encoder at {self.paths.text_encoder} has {vocab} embeddings; they do "
                                 "not belong together")
            return ids, mask, cut

        ids, mask, cut = agreed("tokenizing the prompts", tokens)
        with torch.no_grad(), self.placement.on_device() as enc:
            run_on = self.placement.execution_device
            context = enc(ids.to(run_on), mask.to(run_on)).to(device=self.device, dtype=self.dtype)
        return TextContexts(cond=context[:1], uncond=context[1:2] if negative_prompt is not None else None,
                            num_tokens=[int(n) for n in mask.sum(dim=1)], cut_tokens=cut)

    def close(self) -> None:
        del self.placement
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def encode_prompts(cfg, paths, dims, device: torch.device, dtype: torch.dtype) -> TextContexts:
    encoder = PromptEncoder(cfg, paths, dims, device, dtype)
    try:
        return encoder.encode(*prompt_pair(cfg))
    finally:
        encoder.close()
