"""Write a state dict as safetensors the way Hugging Face tools do: one file, or shards + an index."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], directory, stem: str,
                     max_shard_bytes: int | None = None) -> None:
    """`{stem}.safetensors`, or `{stem}-0000i-of-0000n.safetensors` + `{stem}.safetensors.index.json`."""
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(directory, f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
