"""Prompt -> (input_ids, attention_mask) as Wan2.1 feeds its UMT5 encoder.

The tokenizer is transformers' AutoTokenizer read from a local directory only (Wan2.1 ships it
under google/umt5-xxl/); nothing is fetched from a hub. Prompts are cleaned the way Wan cleans
them (HTML entities unescaped, whitespace runs collapsed), then padded / truncated to `text_len`.
"""
from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence

import torch

# where a Wan2.1 model directory keeps its tokenizer
WAN_TOKENIZER_SUBDIR = os.path.join("google", "umt5-xxl")


def load_tokenizer(path):
    """AutoTokenizer from a local directory (or a Wan2.1 model directory holding google/umt5-xxl/)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    nested = os.path.join(path, WAN_TOKENIZER_SUBDIR)
    if os.path.isdir(nested):
        path = nested
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer directory {path!r} does not exist; it is read locally, never downloaded")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def clean_prompt(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: str | Sequence[str], text_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [B, text_len] (int64), attention_mask [B, text_len] (1 = token, right-padded)."""
    if text_len < 1:
        raise ValueError(f"text_len must be >= 1, got {text_len}")
    if isinstance(prompts, str):
        prompts = [prompts]
    out = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                    max_length=text_len, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return out["input_ids"].to(torch.long), out["attention_mask"].to(torch.long)
