"""Parameter names: native (ours) <-> official Wan2.1 <-> diffusers WanTransformer3DModel.

Native names are the official ones except for the fused projections: `self_attn.qkv` holds the
official q, k, v rows one after the other, `cross_attn.kv` holds k then v. A native parameter is
therefore a list of pieces: (on-disk key, first row, number of rows).
"""
from __future__ import annotations

import re

_FUSED = {
    "self_attn.qkv.": ("self_attn.q.", "self_attn.k.", "self_attn.v."),
    "cross_attn.kv.": ("cross_attn.k.", "cross_attn.v."),
    "cross_attn.kv_img.": ("cross_attn.k_img.", "cross_attn.v_img."),
}

# official -> diffusers, by prefix; block keys are matched after "blocks.N."
_TOP = {
    "patch_embedding.": "patch_embedding.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
    # Wan2.1 I2V image embedder
    "img_emb.proj.0.": "condition_embedder.image_embedder.norm1.",
    "img_emb.proj.1.": "condition_embedder.image_embedder.ff.net.0.proj.",
    "img_emb.proj.3.": "condition_embedder.image_embedder.ff.net.2.",
    "img_emb.proj.4.": "condition_embedder.image_embedder.norm2.",
}
_BLOCK = {
    "self_attn.q.": "attn1.to_q.",
    "self_attn.k.": "attn1.to_k.",
    "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.",
    "self_attn.norm_q.": "attn1.norm_q.",
    "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.",
    "cross_attn.k.": "attn2.to_k.",
    "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.",
    "cross_attn.norm_q.": "attn2.norm_q.",
    "cross_attn.norm_k.": "attn2.norm_k.",
    "cross_attn.k_img.": "attn2.add_k_proj.",
    "cross_attn.v_img.": "attn2.add_v_proj.",
    "cross_attn.norm_k_img.": "attn2.norm_added_k.",
    # official norm3 is the (affine) cross-attention norm; diffusers calls it norm2
    "norm3.": "norm2.",
    "ffn.0.": "ffn.net.0.proj.",
    "ffn.2.": "ffn.net.2.",
    "modulation": "scale_shift_table",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.*)$")

LAYOUTS = ("official", "diffusers")


def _rename(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def official_to_diffusers(key: str) -> str:
    m = _BLOCK_RE.match(key)
    new = _rename(m.group(2), _BLOCK) if m else _rename(key, _TOP)
    if new is None:
        raise KeyError(f"no diffusers name for official key {key!r}")
    return f"blocks.{m.group(1)}.{new}" if m else new


def native_pieces(name: str, rows: int, layout: str) -> list[tuple[str, int, int]]:
    """On-disk (key, first row, rows) pieces that make up native parameter `name` of `rows` rows."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    official = [(name, 0, rows)]
    m = _BLOCK_RE.match(name)
    if m:
        for fused, parts in _FUSED.items():
            if m.group(2).startswith(fused):
                n = rows // len(parts)
                tail = m.group(2)[len(fused):]
                official = [(f"blocks.{m.group(1)}.{p}{tail}", i * n, n) for i, p in enumerate(parts)]
    if layout == "official":
        return official
    return [(official_to_diffusers(k), start, n) for k, start, n in official]
