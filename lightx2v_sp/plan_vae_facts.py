"""What the memory plan needs to know about a VAE, without importing diffusers after the first time.

The facts (parameter counts, the row-band decode's halos, the causal caches) come from diffusers'
AutoencoderKLWan built on the meta device. Importing it costs seconds (diffusers.models.autoencoders
imports every autoencoder, UNet block and transformer model diffusers ships, peft and transformers'
models), and the plan runs in the preflight, before anything else. So they are worked out once per
diffusers version and VAE config and kept as a small JSON file under <cache>/plan/ (cache_dir.py): a
later preflight reads them, and a text-to-video run with Wan2.1's VAE decodes with models/vae_decoder.py
(no diffusers at all; pipeline/shadow_load.py). A missing, unreadable or stale file is worked out again; an unwritable cache
directory only costs the import.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

from lightx2v_sp.cache_dir import cache_root, writable_dir

FORMAT = 1  # bump when the file's layout changes (a change to the code that works them out is seen by itself)


@dataclass(frozen=True)
class VaeFacts:
    numel: int                        # parameters + buffers of the whole VAE (its host copy)
    decode_numel: int                 # decoder + post_quant_conv: what the decode puts on the GPU
    unsupported: Optional[str]        # why it cannot decode in row bands (vae_rows.unsupported_reason)
    halos: tuple                      # ((factor, halo), ...): the widest halo at each upsampling factor
    top: int                          # output rows per latent row
    convs: tuple                      # ((factor, input channels), ...): causal convs caching 2 frames
    conv_out_channels: int


_FACTS: dict[str, VaeFacts] = {}


def vae_facts(vae_kwargs: dict) -> VaeFacts:
    """The facts of the VAE that `vae_kwargs` (its config.json, metadata left out) describes."""
    key = json.dumps(vae_kwargs, sort_keys=True)
    if key not in _FACTS:
        path = _cache_file(key)
        facts = _read(path)
        if facts is None:
            facts = measure(vae_kwargs)
            _write(path, facts)
        _FACTS[key] = facts
    return _FACTS[key]


def measure(vae_kwargs: dict) -> VaeFacts:
    """The facts from diffusers' module on the meta device (imports diffusers)."""
    from lightx2v_sp.models.vae_rows import decoder_stages, unsupported_reason
    from lightx2v_sp.plan_sizes import _cached_convs, _meta_vae, _numel

    vae = _meta_vae(vae_kwargs)
    reason = unsupported_reason(vae)
    halos: dict[int, int] = {}
    top = 1
    if reason is None:
        stages, top = decoder_stages(vae.decoder)
        for s in stages:  # the first stage at each factor has the widest window
            halos.setdefault(s.factor, s.halo)
    convs = tuple(_cached_convs(vae.decoder)) if reason is None else ()
    return VaeFacts(numel=_numel(vae), decode_numel=_numel(vae.decoder) + _numel(vae.post_quant_conv),
                    unsupported=reason, halos=tuple(sorted(halos.items())), top=top, convs=convs,
                    conv_out_channels=vae.decoder.conv_out.in_channels)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "none"


def _code_digest() -> str:
    """Of the files that work the facts out: a change there makes earlier files stale by itself."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in ("plan_vae_facts.py", "plan_sizes.py", os.path.join("models", "vae_rows.py")):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _cache_file(key: str) -> str:
    digest = hashlib.sha256(f"{FORMAT}\n{_code_digest()}\n{_diffusers_version()}\n{key}".encode()).hexdigest()[:24]
    return os.path.join(cache_root(), "plan", f"vae-{digest}.json")


def _read(path: str) -> Optional[VaeFacts]:
    try:
        with open(path) as f:
            raw = json.load(f)
        return VaeFacts(numel=int(raw["numel"]), decode_numel=int(raw["decode_numel"]),
                        unsupported=raw["unsupported"], halos=tuple((int(f), int(h)) for f, h in raw["halos"]),
                        top=int(raw["top"]), convs=tuple((int(f), int(c)) for f, c in raw["convs"]),
                        conv_out_channels=int(raw["conv_out_channels"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: str, facts: VaeFacts) -> None:
    folder = os.path.dirname(path)
    if not writable_dir(folder):
        return
    tmp = None
    try:  # whole or not at all: a concurrent reader sees no file or a whole one
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".vae-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(facts), f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
