"""What the run's settings amounted to on this machine, for the JSON summary's `layout`.

The requested values stay in the summary's `config`; `layout` records what took effect: the
attention kernel `auto` resolved to, and where each component ran. Without CUDA everything runs on
the CPU, so gpu / swap / block placements are recorded as `cpu`, with a note saying they had no effect.
`offload.dit` is recorded as where the DiT weights lived: gpu (resident), block (streamed) or cpu.
"""
from __future__ import annotations

import torch


def effective_layout(cfg, device: torch.device, attention_kernel: str) -> dict:
    cuda = device.type == "cuda"
    te = cfg.text_encoder.device if cuda else "cpu"
    vae = cfg.offload.vae if cuda else "cpu"
    dit = ("block" if cfg.offload.dit == "block" else "gpu") if cuda else "cpu"
    notes = [f"{key}={asked} had no effect: the run's device is {device}, so it ran on the CPU"
             for key, asked in (("text_encoder.device", cfg.text_encoder.device), ("offload.dit", cfg.offload.dit),
                                ("offload.vae", cfg.offload.vae))
             if not cuda and asked not in ("cpu", "none")]
    return {"attention_backend": attention_kernel, "attention_backend_requested": cfg.attention.backend,
            "text_encoder": {"parallel": cfg.text_encoder.parallel, "device": te},
            "offload": {"dit": dit, "vae": vae}, "placement_notes": notes}
