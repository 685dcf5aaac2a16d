"""Prompt -> (input_ids, attention_mask) as Wan2.1 feeds its UMT5 encoder.

The tokenizer is read from a local directory only (Wan2.1 ships it under google/umt5-xxl/, the
-Diffusers repos under tokenizer/); nothing is fetched from a hub. Where the directory has a
`tokenizer.json` (every Wan release does) it runs through the `tokenizers` library directly,
set up as transformers sets up a fast tokenizer for `padding="max_length", truncation=True`: the
same encodings, without importing transformers (seconds of start-up). A directory with only
`spiece.model` goes through transformers' AutoTokenizer. Prompts are cleaned the way Wan cleans
them (HTML entities unescaped, whitespace runs collapsed), then padded / truncated to `text_len`.
"""
from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence

import torch

# where a Wan2.1 model directory keeps its tokenizer
WAN_TOKENIZER_SUBDIR = os.path.join("google", "umt5-xxl")


class FastTokenizer:
    """tokenizer.json with its special tokens and sides worked out as transformers does: the settings of
    tokenizer_config.json, over which special_tokens_map.json's special tokens go unless the config lists
    `added_tokens_decoder` (the newer format, which makes the map unused); then, for what neither sets,
    the padding and truncation that tokenizer.json itself holds."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.path = path
        self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        settings = _read_json(os.path.join(path, "tokenizer_config.json"))
        if "added_tokens_decoder" not in settings:
            settings.update(_read_json(os.path.join(path, "special_tokens_map.json")))
        padding, truncation = self.tokenizer.padding, self.tokenizer.truncation
        pad = settings["pad_token"] if "pad_token" in settings else (padding or {}).get("pad_token")
        self.pad_token = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_id = None if self.pad_token is None else self.tokenizer.token_to_id(self.pad_token)
        self.padding_side = settings.get("padding_side") or (padding or {}).get("direction", "right")
        self.truncation_side = settings.get("truncation_side") or (truncation or {}).get("direction", "right")

    def encode(self, texts: list[str], text_len: int) -> tuple[list[list[int]], list[list[int]]]:
        if self.pad_id is None:
            why = "no padding token" if self.pad_token is None else f"a padding token {self.pad_token!r} not in its vocabulary"
            raise ValueError(f"the tokenizer at {self.path} has {why}, so prompts cannot be padded to "
                             "text_encoder.text_len")
        tok = self.tokenizer
        tok.enable_truncation(max_length=text_len, stride=0, strategy="longest_first", direction=self.truncation_side)
        tok.enable_padding(length=text_len, direction=self.padding_side, pad_id=self.pad_id, pad_type_id=0,
                           pad_token=self.pad_token)
        out = tok.encode_batch(texts, add_special_tokens=True)
        return [e.ids for e in out], [e.attention_mask for e in out]

    def count(self, text: str) -> int:
        """Tokens of `text` with the special tokens, before truncation."""
        tok = self.tokenizer
        tok.no_truncation()
        tok.no_padding()
        return len(tok.encode(text, add_special_tokens=True).ids)


def _read_json(file: str) -> dict:
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(path):
    """The tokenizer of a local directory (or of a Wan2.1 model directory holding google/umt5-xxl/)."""
    path = os.fspath(path)
    nested = os.path.join(path, WAN_TOKENIZER_SUBDIR)
    if os.path.isdir(nested):
        path = nested
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer directory {path!r} does not exist; it is read locally, never downloaded")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return FastTokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def clean_prompt(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def token_count(tokenizer, text: str) -> int:
    """Tokens of the cleaned `text` with the special tokens, before truncation."""
    if isinstance(tokenizer, FastTokenizer):
        return tokenizer.count(clean_prompt(text))
    return len(tokenizer(clean_prompt(text), add_special_tokens=True)["input_ids"])


def tokenize(tokenizer, prompts: str | Sequence[str], text_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [B, text_len] (int64), attention_mask [B, text_len] (1 = token, right-padded)."""
    if text_len < 1:
        raise ValueError(f"text_len must be >= 1, got {text_len}")
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = [clean_prompt(p) for p in prompts]
    if isinstance(tokenizer, FastTokenizer):
        ids, mask = tokenizer.encode(texts, text_len)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=text_len, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    return out["input_ids"].to(torch.long), out["attention_mask"].to(torch.long)
