"""Loading the DiT and the VAE while the text stage runs: one loader thread per rank.

A one-shot run reads three checkpoints: UMT5 (11 GB for umt5-xxl), the DiT and the VAE. The text
stage is mostly the reading of UMT5 (the encoding itself is two prompts), so the DiT and VAE reads,
and the attention kernel's first-use work (attention/kernel_cache.py), go to a thread started
before it. The rules that keep a multi-rank job as safe as without the thread:

- The thread runs no collective. Every rank's main thread runs the same collectives in the same
  order as before; the thread's outcome (the models, or the exception) is handed over at the point
  where the load used to run, inside `checks.agreed`, so an error is still agreed by every rank.
- On CUDA it works on its own stream (its copies overlap the encoder's instead of queueing behind
  them) and synchronises that stream before handing the models over.
- The DiT comes to the GPU during the text stage only when the memory plan's text-stage peak plus
  the DiT's resident weights fit in the free memory (`load_alongside_text`); else the load runs
  after the text stage, in the main thread, as it always did. Same weights, same video either way.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, Generic, Optional, TypeVar

import torch

from lightx2v_sp.attention import resolve_backend
from lightx2v_sp.attention.kernel_cache import attention_shapes, prepare_kernel
from lightx2v_sp.models.vae import WanVAE

from .experts import load_experts
from .loading import load_checked

log = logging.getLogger("lightx2v_sp")

T = TypeVar("T")

# The GIL's switch interval while a loader runs beside the denoise: the main thread gives up the GIL
# in every torch call and must win it back before the next launch; at Python's default 5 ms a thread
# busy importing holds it that long each time, so the launches fell behind the GPU (on the CPU the
# denoise stalled for the whole import). At 0.1 ms a forward's ~900 launches wait at most ~90 ms
# together, well inside the GPU's time for them.
QUICK_SWITCH_S = 1e-4


class Loader(Generic[T]):
    """`fn()` in a background thread (`background=True`) or, at `result()`, in the caller's."""

    def __init__(self, fn: Callable[[], T], device: torch.device, background: bool, quick_switch: bool = False):
        if device.type == "cuda" and device.index is None:  # set_device in the thread needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        self._fn, self._device = fn, device
        self._value: Optional[T] = None
        self._error: Optional[BaseException] = None
        self.seconds: Optional[float] = None  # the load's own wall time, wherever it ran
        self._thread = None
        self._switch = None
        if background:  # (the caller has imported what both threads use: import_shared_packages)
            if quick_switch:
                self._switch = sys.getswitchinterval()
                sys.setswitchinterval(QUICK_SWITCH_S)
            self._thread = threading.Thread(target=self._run, name="lightx2v_sp-loader", daemon=True)
            self._thread.start()

    @property
    def background(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)  # a new thread starts on device 0
                stream = torch.cuda.Stream(self._device)
                with torch.cuda.stream(stream):
                    self._value = self._fn()
                stream.synchronize()  # the main stream may use the weights from now on
            else:
                self._value = self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            self._error = e
        self.seconds = round(time.perf_counter() - start, 4)
        if self._switch is not None:
            sys.setswitchinterval(self._switch)

    def result(self) -> T:
        """The loaded value; the load's exception, raised here, in the caller's thread."""
        if self._thread is None:
            start = time.perf_counter()
            try:
                return self._fn()
            finally:
                self.seconds = round(time.perf_counter() - start, 4)
        self._thread.join()
        error, value = self._error, self._value
        self._error = self._value = None
        if error is not None:
            raise error
        return value

    def abandon(self) -> None:
        """The run failed before it needed the models: wait for the thread (no load outlives the run)
        and drop what it loaded."""
        if self._thread is not None:
            self._thread.join()
            self._error = self._value = None

    def summary(self) -> dict:
        return {"alongside_text": self.background, "load_s": self.seconds,
                "note": "load_s: the DiT + VAE load's own wall time (the DiT's alone with vae_during_denoise); "
                        "alongside_text: it ran in a thread during the text stage, so the 'load' stage time is "
                        "only what was left of it; with vae_during_denoise, vae_imports_s: diffusers' VAE "
                        "imported piece by piece in the main thread while the GPU ran queued denoising steps "
                        "(shadow_load.py; pieces left when the denoise ended ran after it), vae_load_s: then "
                        "the VAE's weights read in a thread (the 'vae' stage is what was left of both)"}


def import_shared_packages(vae: bool = True) -> None:
    """Import, in the caller's thread, the lazily loaded classes both threads may use. transformers' and
    diffusers' lazy modules are not safe to initialise from two threads at once: the loader's VAE
    import (diffusers -> peft -> transformers.AutoModel) racing the tokenizer's import of
    transformers fails with "cannot import name 'AutoModel' from 'transformers'" (seen on CPU).
    `vae` False: the VAE loads during the denoise (`vae_loads_later`), after the text stage, when the
    main thread imports nothing more, so its classes are left to that thread, and the text stage
    imports neither package (the tokenizer reads tokenizer.json with `tokenizers`; transformers only
    for a directory without one, while the loader thread reads the DiT alone)."""
    if vae:
        from diffusers import AutoencoderKLWan  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401


def vae_loads_later(cfg, kind, keep: bool) -> bool:
    """Whether the VAE loads while the video denoises rather than before: a one-job run that needs it
    only to decode (pipeline/shadow_load.py: our decoder's weights read in a thread while the GPU
    works). Image-to-video needs it before the denoise; a server keeps it loaded."""
    from .conditioning import needs_image_stage

    return not keep and not needs_image_stage(kind, cfg)


def load_vae_checked(cfg, paths, kind, out_dim: int, decode_only: bool = False) -> WanVAE:
    """The VAE on the host, checked against the DiT's latent channels and the kind's strides. Runs no
    collective; its errors are the caller's to agree on. `decode_only`: its decoder alone where
    models/vae_decoder.py reproduces it (a run that never encodes)."""
    from .runner import DTYPES

    vae = load_checked("VAE", paths.vae,
                       lambda: WanVAE.from_pretrained(paths.vae, DTYPES[cfg.vae.dtype], decode_only=decode_only),
                       weights=lambda v: v.vae)
    check_vae_channels(vae.z_dim, out_dim, paths)  # the weights' own, beside the preflight's from the config
    if (vae.temporal_stride, vae.spatial_stride) != kind.vae_strides:
        raise ValueError(f"the VAE at {paths.vae} compresses time x space by {vae.temporal_stride} x "
                         f"{vae.spatial_stride}, its config.json says {kind.vae_strides}")
    return vae


def check_vae_channels(z_dim: int, out_dim: int, paths) -> None:
    """The VAE's latent channels against what the DiT denoises."""
    if z_dim != out_dim:
        raise ValueError(f"the VAE at {paths.vae} has z_dim={z_dim} latent channels, the DiT at {paths.dit} "
                         f"denoises out_dim={out_dim}; they are not one model")


def load_alongside_text(cfg, device: torch.device, world: int, rank: int, shapes) -> bool:
    """Whether the DiT(s) may be read while the text encoder is on the GPU (always on the CPU).
    `shapes`: the preflight's plan_sizes.Shapes of the resolved checkpoint."""
    if device.type != "cuda":
        return True
    if cfg.offload.dit != "none":  # block / swap: the DiT is read to the host; the GPU sees no more
        return True
    from lightx2v_sp.plan import USABLE, dit_bytes, plan_rank

    text = plan_rank(cfg, shapes, world, rank).stages[0]
    dit = sum(dit_bytes(c, cfg.model.dtype, cfg.model.quant)["resident"] for c in shapes.experts)
    free, _ = torch.cuda.mem_get_info(device)
    fits = text.gpu_total + dit <= USABLE * free
    if not fits:
        log.info("the DiT loads after the text stage: with the text encoder it would need %.2f GiB of the "
                 "%.2f GiB free", (text.gpu_total + dit) / 2**30, free / 2**30)
    return fits


def load_weights(cfg, paths, kind, device: torch.device, dtype: torch.dtype, load_vae: bool, dims, geometry):
    """(the DiT(s), the VAE or None, the attention kernel's name): what the denoise and decode stages
    need, the kernel ready to run (attention/kernel_cache.py). Runs no collective (the Loader's thread
    may run it); its errors are the caller's to agree on."""
    models = load_checked("DiT", paths.dit, lambda: load_experts(kind.experts, cfg, device, dtype),
                          weights=torch.nn.ModuleList)
    model = models[0]
    vae = load_vae_checked(cfg, paths, kind, model.config.out_dim) if load_vae else None
    # before the progress bar: `auto` logs its pick here, and the summary records it
    # (with a ring, the self-attention's kernel must return its log-sum-exp)
    head_dim = model.config.dim // model.config.num_heads
    kernel = resolve_backend(cfg.attention.backend, device, dtype, head_dim, need_lse=dims.ring_degree > 1)
    if cfg.attention.warmup:
        # a ring member's kernel sees one K/V block of the sequence at a time: about 1/ring of it
        tokens = -(-geometry.tokens // dims.ring_degree)
        kernel = prepare_kernel(kernel, cfg.attention.backend, device, dtype, head_dim,
                                attention_shapes(tokens, dims.ulysses_degree, cfg.text_encoder.text_len),
                                need_lse=dims.ring_degree > 1)
    return models, vae, kernel
