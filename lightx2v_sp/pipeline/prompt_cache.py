"""Text contexts of recent prompt pairs, so a job that repeats a pair does not encode it again.

The key is the pair (prompt, negative prompt or None without guidance), not each prompt alone:
the encoder runs a pair as one batch, and a batch of two need not give the same bits as two
batches of one (other GEMM shapes, other kernels). Keyed by pair, a request gives the same
contexts whether they were encoded now or for an earlier job, so a served video equals the one
`generate` writes for the same settings. A new prompt with the usual negative prompt re-encodes
both in one batch: on a GPU that costs about what encoding the new prompt alone would.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from lightx2v_sp.config import uses_cfg


def prompt_pair(cfg) -> tuple[str, Optional[str]]:
    """(prompt, negative prompt) of a run; the negative prompt is None when guidance is off."""
    return cfg.prompt, cfg.negative_prompt if uses_cfg(cfg.sample) else None


class PromptCache:
    """The last `size` pairs' contexts, least recently used dropped first (size 0: none kept)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()

    def get(self, pair):
        contexts = self._entries.get(pair)
        if contexts is not None:
            self._entries.move_to_end(pair)
        return contexts

    def put(self, pair, contexts) -> None:
        if self.size <= 0:
            return
        self._entries[pair] = contexts
        self._entries.move_to_end(pair)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
