"""The VAE of a one-job text-to-video run, loaded in the GPU's shadow while the video denoises.

With Wan2.1's VAE layout the run loads our decoder (models/vae_decoder.py): nothing to import, and
only the decoder's weights are read, in a thread (file reads and copies, which release the GIL).
Other layouts (Wan2.2's) load diffusers' AutoencoderKLWan, whose import is mostly Python (transformers'
utilities, diffusers' quantizers and every transformer and UNet block its `vae` module pulls in:
1.6 s on a 2-core CPU). Imported in a thread during the denoise, such an import held the GIL that the
main thread needs to queue each step's kernels and the GPU went idle (the first steps of a 1.3B 480p
run took 2.7-3.4 s instead of 1.0 s on one H100; BENCHMARKS.md, "Time to video"). So it runs in the
main thread itself, one package per denoising step, after the step's DiT forwards are queued and
before the sampler step (which may wait for them); then the weights are read in a thread, and `result()`
joins it after the denoise. Pieces longer than a step still cost the difference (the pieces summed to
about 4 s on the H100 host, measured while they still ran after a waiting sampler step), which is why
Wan2.1's decoder is our own.
"""
from __future__ import annotations

import importlib
import time
from typing import Callable, Generic, Optional, TypeVar

import torch

from .prefetch import Loader

T = TypeVar("T")

# diffusers' AutoencoderKLWan, in import order, in pieces of at most ~0.65 s (2-core CPU): each piece
# imports what the ones before left; a name another diffusers version lacks is skipped, and the load
# itself imports whatever is still missing
VAE_IMPORTS = ("transformers.utils.import_utils", "transformers", "diffusers.utils", "diffusers.quantizers",
               "diffusers.models.modeling_utils", "diffusers.models.transformers", "diffusers.models.unets",
               "diffusers.models.autoencoders.vae", "diffusers.models.autoencoders.autoencoder_kl_wan")


class ShadowLoad(Generic[T]):
    """`modules` imported one per `step()` call, then `load()` in a background thread."""

    def __init__(self, load: Callable[[], T], modules=VAE_IMPORTS):
        self._load = load
        self._pending = list(modules)
        self._loader: Optional[Loader[T]] = None
        self.import_s: dict[str, float] = {}  # each piece's import time, where it ran

    def step(self) -> None:
        """One piece of the work: the next import, or after the last one the load's start."""
        if self._pending:
            name = self._pending.pop(0)
            start = time.perf_counter()
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a warm-up only: the load imports what it needs and reports its errors
                pass
            self.import_s[name] = round(time.perf_counter() - start, 4)
        elif self._loader is None:
            self._loader = Loader(self._load, torch.device("cpu"), background=True, quick_switch=True)

    def result(self) -> T:
        """The loaded value (what is left of the imports runs now); the load's exception raised here."""
        while self._loader is None:
            self.step()
        return self._loader.result()

    def abandon(self) -> None:
        """The run failed: wait for a started load and drop it (no load outlives the run)."""
        if self._loader is not None:
            self._loader.abandon()

    def summary(self) -> dict:
        return {"vae_imports_s": dict(self.import_s), "vae_import_s": round(sum(self.import_s.values()), 4),
                "vae_load_s": self._loader.seconds if self._loader is not None else None}
