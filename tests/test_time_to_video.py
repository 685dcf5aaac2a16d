"""Time to video (issue 30): the loader thread, the text encoder read to where it runs, FlashAttention-4's
kernel cache and first-call check, and the per-step work the runner no longer repeats.

Everything here runs on the CPU: JIT kernels are stand-ins registered under FA4's name, and CUDA-only
choices are checked through the functions that make them.
"""
import logging
import os
import threading

import pytest
import torch

from lightx2v_sp.attention import backends, kernel_cache
from lightx2v_sp.config import load_config
from lightx2v_sp.pipeline import prefetch
from lightx2v_sp.pipeline.runner import run
from lightx2v_sp.pipeline.text import load_device

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")


@pytest.fixture
def registry():
    yield backends
    backends.discover()  # drop the stand-ins, rebuild what is installed


def _sdpa(q, k, v):
    return backends.kernel_info("sdpa").fn(q, k, v)


SHAPES = [(24, 24), (24, 5)]


def test_prepare_kernel_keeps_a_kernel_that_agrees_with_sdpa(registry, caplog):
    calls = []
    registry.register_backend("flash_attn4", lambda q, k, v: calls.append(q.shape) or _sdpa(q, k, v), source="x")
    with caplog.at_level(logging.INFO, logger="lightx2v_sp"):
        name = kernel_cache.prepare_kernel("flash_attn4", "auto", torch.device("cpu"), torch.float32, 8, SHAPES)
    assert name == "flash_attn4"
    assert [tuple(s) for s in calls] == [(1, 24, 1, 8), (1, 24, 1, 8)]  # one call per (query, key) length pair
    assert "attention kernel flash_attn4 ready" in caplog.text


@pytest.mark.parametrize("broken", ["wrong", "raises", "nan"])
def test_prepare_kernel_falls_back_under_auto_and_fails_when_named(registry, caplog, broken):
    def kernel(q, k, v):
        if broken == "raises":
            raise RuntimeError("CUDA Error: cudaErrorInvalidDeviceFunction")
        out = _sdpa(q, k, v)
        return out * 1.5 if broken == "wrong" else out * float("nan")

    registry.register_backend("flash_attn4", kernel, source="x")
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="lightx2v_sp"):
        name = kernel_cache.prepare_kernel("flash_attn4", "auto", cpu, torch.float32, 8, SHAPES)
    assert name == "sdpa" and "auto uses sdpa instead" in caplog.text
    # every later `auto` call for such inputs runs the fallback, not the broken kernel
    registry.AUTO_PREFERENCE["other"] = ("flash_attn4", "sdpa")
    try:
        assert registry.resolve_backend("auto", cpu, torch.float32, 8) == "sdpa"
    finally:
        registry.AUTO_PREFERENCE["other"] = ("sdpa",)
    with pytest.raises(ValueError, match="flash_attn4 failed its first call"):
        kernel_cache.prepare_kernel("flash_attn4", "flash_attn4", cpu, torch.float32, 8, SHAPES)


def test_kernels_without_jit_are_not_called():
    assert kernel_cache.prepare_kernel("sdpa_cudnn", "auto", torch.device("cpu"), torch.float32, 8, SHAPES) \
        == "sdpa_cudnn"


def test_attention_shapes_of_a_run():
    # self-attention: all tokens (Ulysses splits heads); cross-attention: this rank's tokens x the text
    assert kernel_cache.attention_shapes(32760, 1, 512) == [(32760, 32760), (32760, 512)]
    assert kernel_cache.attention_shapes(1001, 3, 512) == [(1001, 1001), (334, 512)]


def test_fa4_disk_cache_is_switched_on_before_import(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTX2V_SP_CACHE", str(tmp_path / "cache"))
    for name in (kernel_cache.FA4_ENABLED, kernel_cache.FA4_DIR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(__import__("sys").modules, "flash_attn.cute", raising=False)
    monkeypatch.setattr(kernel_cache.importlib.util, "find_spec", lambda name: object())  # "installed"
    path = kernel_cache.enable_fa4_disk_cache()
    assert path == str(tmp_path / "cache" / "kernels" / "flash_attn_cute") and os.path.isdir(path)
    assert os.environ[kernel_cache.FA4_ENABLED] == "1" and os.environ[kernel_cache.FA4_DIR] == path
    monkeypatch.setenv(kernel_cache.FA4_ENABLED, "0")  # the user's "off" stays off
    assert kernel_cache.enable_fa4_disk_cache() is None and os.environ[kernel_cache.FA4_ENABLED] == "0"
    monkeypatch.delenv(kernel_cache.FA4_ENABLED)
    monkeypatch.setattr(kernel_cache, "writable_dir", lambda p: False)  # a read-only cache: compile each time
    assert kernel_cache.enable_fa4_disk_cache() is None and kernel_cache.FA4_ENABLED not in os.environ
    monkeypatch.setattr(kernel_cache.importlib.util, "find_spec", lambda name: None)  # FA4 absent: nothing
    assert kernel_cache.enable_fa4_disk_cache() is None


def test_loader_hands_its_error_to_the_caller_and_abandon_waits():
    started, release = threading.Event(), threading.Event()

    def load():
        started.set()
        release.wait(10)
        raise ValueError("the DiT at X is truncated")

    loader = prefetch.Loader(load, torch.device("cpu"), background=True)
    assert started.wait(10) and loader.background
    release.set()
    with pytest.raises(ValueError, match="truncated"):
        loader.result()
    assert loader.seconds is not None

    release.clear()
    loader = prefetch.Loader(load, torch.device("cpu"), background=True)
    threading.Timer(0.2, release.set).start()
    loader.abandon()  # joins: no load outlives a failed run
    assert not loader._thread.is_alive()
    assert prefetch.Loader(lambda: 7, torch.device("cpu"), background=False).result() == 7


def test_text_encoder_is_read_to_where_it_runs():
    cfg = load_config(None, [])
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for mode, expected in (("gpu", cuda), ("swap", cuda), ("cpu", cpu)):
        cfg.text_encoder.device = mode
        assert load_device(cfg.text_encoder, cuda) == expected
        assert load_device(cfg.text_encoder, cpu) == cpu


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_loading_alongside_the_text_stage_gives_the_same_video(tmp_path, monkeypatch, device):
    # on CUDA: the loader thread's own stream, the encoder read straight to the GPU, the weights handed over
    results = {}
    for alongside in (True, False):
        monkeypatch.setattr("lightx2v_sp.pipeline.runner.load_alongside_text", lambda *a, _v=alongside: _v)
        cfg = load_config(CONFIG, [f"output.path={tmp_path}/v_{alongside}.mp4", "sample.steps=2",
                                   f"device={device}", "text_encoder.device=gpu"])
        results[alongside] = run(cfg, torch.device(device, 0) if device == "cuda" else torch.device(device),
                                 progress=False)
        assert results[alongside].summary["prefetch"]["alongside_text"] is alongside
    assert torch.equal(results[True].latents, results[False].latents)


def test_rope_tables_are_built_once_per_grid():
    from lightx2v_sp.models.wan import WanConfig
    from lightx2v_sp.models.wan.model import RotaryEmbedding

    rope = RotaryEmbedding(WanConfig.tiny())
    first = rope((3, 4, 5), torch.device("cpu"))
    assert rope((3, 4, 5), torch.device("cpu")) is first  # the next step reuses them
    fresh = rope._tables((3, 4, 5), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first, fresh))
    other = rope((2, 4, 5), torch.device("cpu"))
    assert other[0].shape[0] == 40 and other is not first


def test_first_step_cost():
    from lightx2v_sp.pipeline.step_times import first_step_cost

    assert first_step_cost([3.0, 1.0, 1.2, 1.1]) == {"median_step_s": 1.1, "first_step_extra_s": 1.9}
    assert first_step_cost([3.0]) == {"median_step_s": None, "first_step_extra_s": None}


def test_compile_cache_goes_under_our_cache_unless_set(tmp_path, monkeypatch):
    from lightx2v_sp.cache_dir import enable_compile_cache

    monkeypatch.setenv("LIGHTX2V_SP_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert enable_compile_cache() == str(tmp_path / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert enable_compile_cache() == "/elsewhere"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_check_finds_every_nan_and_inf(dtype):
    from lightx2v_sp.pipeline.finite import _all_finite

    x = torch.randn(33, 65).to(dtype)
    assert bool(_all_finite(x)) and bool(_all_finite(x[:0]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (17, 40), (32, 64)):
            y = x.clone()
            y[where] = bad
            assert not bool(_all_finite(y)), (bad, where)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_parallel_copy_fills_every_destination_and_raises_read_errors(monkeypatch, device):
    from lightx2v_sp.models import parallel_copy
    from lightx2v_sp.models.parallel_copy import copy_all

    monkeypatch.setattr(parallel_copy, "MIN_PARALLEL_BYTES", 0)  # threads even for these few bytes

    src = [torch.randn(n, 7) for n in (5, 40, 3, 17, 9)]  # host tensors, bf16 destinations: a dtype cast too
    weight = torch.nn.Parameter(torch.empty(sum(t.shape[0] for t in src), 7, dtype=torch.bfloat16, device=device))
    rows = torch.tensor([0] + [t.shape[0] for t in src]).cumsum(0).tolist()
    jobs = [(weight.narrow(0, a, b - a), lambda t=t: t) for t, a, b in zip(src, rows, rows[1:])]
    copy_all(jobs, workers=3)
    assert torch.equal(weight.detach().cpu(), torch.cat(src).to(torch.bfloat16))

    def truncated():
        raise OSError("unexpected end of file")
    with pytest.raises(OSError, match="end of file"):
        copy_all(jobs[:2] + [(torch.empty(1), truncated)], workers=3)


def test_prepare_kernel_keeps_a_kernel_whose_first_call_only_failed_to_cache(registry, caplog):
    calls = []

    def kernel(q, k, v):  # FA4: the kernel is in memory, the disk export raised on the first call
        calls.append(1)
        if len(calls) == 1:
            raise OSError("No space left on device")
        return _sdpa(q, k, v)

    registry.register_backend("flash_attn4", kernel, source="x")
    with caplog.at_level(logging.WARNING, logger="lightx2v_sp"):
        assert kernel_cache.prepare_kernel("flash_attn4", "auto", torch.device("cpu"), torch.float32, 8,
                                           SHAPES) == "flash_attn4"
    assert "ran on its second call" in caplog.text


def test_mp4_encoded_while_decoding_is_the_same_file(tmp_path, monkeypatch):
    # the frames reach the encoder chunk by chunk during the decode (video_stream.py); the file must be
    # the one the whole-video write makes of the same frames: same encoder, same settings, same bytes
    from lightx2v_sp.models.vae import WanVAE

    base = ["sample.steps=1", "parallel.ulysses_degree=1"]
    streamed = run(load_config(CONFIG, base + [f"output.path={tmp_path}/a.mp4"]), torch.device("cpu"),
                   progress=False, keep_video=True)
    frames = streamed.video.shape[1]
    assert streamed.summary["vae"]["frames_encoded_while_decoding"] == frames == streamed.summary["video"]["frames"]
    assert frames > 5  # more than one chunk of the decoder (1 frame, then 4 per latent frame)

    real = WanVAE.frames_to
    monkeypatch.setattr(WanVAE, "frames_to", lambda self, sink: real(self, None))  # never streams
    whole = run(load_config(CONFIG, base + [f"output.path={tmp_path}/b.mp4"]), torch.device("cpu"), progress=False)
    assert whole.summary["vae"]["frames_encoded_while_decoding"] == 0
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_a_decode_that_fails_midway_stops_the_encoder_and_leaves_no_file(tmp_path, monkeypatch):
    from lightx2v_sp.pipeline import AgreedError

    calls = []

    def failing(module, args, out):  # the third latent frame's decode fails after two reached the encoder
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted decoder failure")

    from lightx2v_sp.models import vae as vae_mod

    real = vae_mod.WanVAE.frames_to

    def frames_to(self, sink):
        self.vae.decoder.register_forward_hook(failing)
        return real(self, sink)

    monkeypatch.setattr(vae_mod.WanVAE, "frames_to", frames_to)
    cfg = load_config(CONFIG, ["sample.steps=1", "parallel.ulysses_degree=1", f"output.path={tmp_path}/v.mp4"])
    with pytest.raises(AgreedError, match="planted decoder failure"):
        run(cfg, torch.device("cpu"), progress=False)
    assert os.listdir(tmp_path) == []  # the temporary mp4 the encoder was writing is gone
    assert not [t for t in threading.enumerate() if t.name == "lightx2v_sp-mp4"]  # and its thread ended


def test_abort_after_a_close_cut_short_stops_the_encoder_and_removes_the_file(tmp_path):
    # a signal during close()'s wait: OutputPair's exit then aborts, which must still wait for the encoder
    # (else ffmpeg goes on writing the whole file after the run reported its failure) and remove the file
    import numpy as np

    from lightx2v_sp.pipeline.video_stream import VideoStream

    path = tmp_path / "v.mp4"
    stream = VideoStream(str(path), 8, 8)
    stream.put(np.random.default_rng(0).integers(0, 255, (24, 64, 64, 3), dtype=np.uint8))
    stream._end()  # what close() had done when the signal cut its join short
    stream.abort()
    assert not stream._thread.is_alive() and not path.exists()


def test_abort_after_a_close_cut_short_on_a_full_queue_does_not_hang(tmp_path, monkeypatch):
    # the signal landed while close() waited to queue the end marker (the encoder 32 chunks behind):
    # the marker never went in, and abort() must send it rather than wait for a worker that waits for it
    import numpy as np

    from lightx2v_sp.pipeline import video_stream

    held = threading.Event()

    class SlowWriter:
        def append_data(self, frame):
            held.wait(10)

        def close(self):
            pass

    monkeypatch.setattr(video_stream, "open_writer", lambda *a: SlowWriter())
    stream = video_stream.VideoStream(str(tmp_path / "v.mp4"), 8, 8)
    chunk = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    for _ in range(video_stream.MAX_QUEUED_CHUNKS + 1):  # one in the worker's hands, the queue full
        stream.put(chunk)
    assert stream._queue.full() and not stream._ended  # close() cut short before its put returned
    threading.Timer(0.3, held.set).start()  # the encoder finishes its frame, then skips the rest
    done = threading.Event()
    threading.Thread(target=lambda: (stream.abort(), done.set()), daemon=True).start()
    assert done.wait(10), "abort() hung"
    assert not stream._thread.is_alive()


def test_the_vae_loaded_during_the_denoise_gives_the_same_video(tmp_path, monkeypatch):
    # text-to-video, one job: the VAE loads while the video denoises (its decoder alone, ours); the video
    # is the one of diffusers' VAE loaded with the DiT, and the summary says which ran
    from lightx2v_sp.pipeline import runner

    base = ["sample.steps=2", "parallel.ulysses_degree=1"]
    later = run(load_config(CONFIG, base + [f"output.path={tmp_path}/a.mp4"]), torch.device("cpu"), progress=False)
    assert later.summary["prefetch"]["vae_during_denoise"] is True
    assert later.summary["prefetch"]["vae_load_s"] > 0 and "vae" in later.summary["stage_times_s"]
    monkeypatch.setattr(runner, "vae_loads_later", lambda *a: False)
    before = run(load_config(CONFIG, base + [f"output.path={tmp_path}/b.mp4"]), torch.device("cpu"), progress=False)
    assert before.summary["prefetch"]["vae_during_denoise"] is False and "vae" not in before.summary["stage_times_s"]
    # decode only: our decoder (models/vae_decoder.py) against diffusers' AutoencoderKLWan, the same video
    assert (later.summary["vae"]["module"], before.summary["vae"]["module"]) == ("WanVAEDecoder", "AutoencoderKLWan")
    assert torch.equal(later.latents, before.latents)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_a_vae_that_fails_to_load_during_the_denoise_is_one_error_and_no_file(tmp_path, monkeypatch):
    from lightx2v_sp.pipeline import AgreedError
    from lightx2v_sp.pipeline import prefetch as pf

    def broken(*a, **k):
        raise ValueError("the VAE at X holds NaN or inf values (planted)")

    monkeypatch.setattr("lightx2v_sp.pipeline.runner.load_vae_checked", broken)
    cfg = load_config(CONFIG, ["sample.steps=2", "parallel.ulysses_degree=1", f"output.path={tmp_path}/v.mp4"])
    with pytest.raises(AgreedError, match="planted"):
        run(cfg, torch.device("cpu"), progress=False)
    assert os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name == "lightx2v_sp-loader"]
    assert pf.sys.getswitchinterval() == pytest.approx(0.005)  # the loader restored the GIL's switch interval


def test_image_to_video_and_servers_load_the_vae_before_the_denoise():
    from types import SimpleNamespace

    t2v = SimpleNamespace(image_input=False, first_frame=False)
    i2v = SimpleNamespace(image_input=True, first_frame=False)
    cfg = load_config(CONFIG, [])
    assert prefetch.vae_loads_later(cfg, t2v, keep=False)
    assert not prefetch.vae_loads_later(cfg, t2v, keep=True)  # a server keeps it loaded for every job
    assert not prefetch.vae_loads_later(cfg, i2v, keep=False)  # the image is encoded before the denoise


def test_a_vae_of_another_model_is_refused_in_the_preflight(tmp_path, monkeypatch):
    # the VAE may load only after the denoise, so its latent channels are checked from its config first:
    # Wan2.2 TI2V's VAE (48 channels) with the Wan2.1 DiT (16) is one line before any stage runs
    from lightx2v_sp.models.tiny import ensure_tiny_model
    from lightx2v_sp.pipeline import AgreedError

    vae = os.path.join(ensure_tiny_model(variant="wan2.2-ti2v-5b"), "vae")
    cfg = load_config(CONFIG, ["sample.steps=2", f"model.vae_path={vae}", f"output.path={tmp_path}/v.mp4"])

    def text_stage(*a, **k):
        raise AssertionError("the text stage ran: the mismatch was not caught in the preflight")

    monkeypatch.setattr("lightx2v_sp.pipeline.runner.PromptEncoder", text_stage)
    with pytest.raises((AgreedError, ValueError), match="z_dim=48 latent channels.*out_dim=16"):
        run(cfg, torch.device("cpu"), progress=False)
    assert os.listdir(tmp_path) == []


def test_the_vae_imports_run_in_the_main_thread_one_per_step_before_the_step_waits(tmp_path, monkeypatch):
    # shadow_load.py: the GIL-heavy import runs where the main thread would only wait for the GPU,
    # one piece per step; the weights are read in a thread afterwards; pieces a short run leaves run
    # at result(); a failing piece is skipped (the load reports real errors)
    import threading

    from lightx2v_sp.pipeline import denoise as dn
    from lightx2v_sp.pipeline import runner, shadow_load

    events, made = [], []
    real_check = dn.check_latents
    monkeypatch.setattr(dn, "check_latents", lambda *a: (events.append("wait"), real_check(*a)))

    class Recorded(shadow_load.ShadowLoad):
        def __init__(self, load, modules):
            assert modules == ()  # the tiny VAE has Wan2.1's layout: vae_decoder.py, no diffusers to import
            super().__init__(lambda: (events.append(("load", threading.current_thread().name)), load())[1],
                             modules=["colorsys", "no_such_module_x", *shadow_load.VAE_IMPORTS])
            made.append(self)

        def step(self):
            events.append(("piece", threading.current_thread().name))
            super().step()

    monkeypatch.setattr(runner, "ShadowLoad", Recorded)
    cfg = load_config(CONFIG, ["sample.steps=2", "parallel.ulysses_degree=1", f"output.path={tmp_path}/v.mp4"])
    result = run(cfg, torch.device("cpu"), progress=False)
    assert events[:4] == [("piece", "MainThread"), "wait", ("piece", "MainThread"), "wait"]
    assert ("load", "lightx2v_sp-loader") in events  # the weights: in a thread, after every import
    pieces = [e for e in events if e[0] == "piece"]
    assert events.index(("load", "lightx2v_sp-loader")) > events.index(pieces[-1])
    imports = result.summary["prefetch"]["vae_imports_s"]
    assert list(imports) == ["colorsys", "no_such_module_x", *shadow_load.VAE_IMPORTS]  # all ran, in order
    assert result.summary["prefetch"]["vae_load_s"] > 0 and len(made) == 1
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_a_vae_index_that_cannot_be_read_is_one_agreed_error_and_no_file(tmp_path):
    # the choice of decoder (models/vae.py: decodes_without_diffusers) reads the VAE's shard index before
    # the denoise, outside any agreement: it must not raise there, so the load reports it, agreed
    import shutil

    from lightx2v_sp.models import tiny
    from lightx2v_sp.models.vae import decodes_without_diffusers
    from lightx2v_sp.pipeline import AgreedError

    model = tmp_path / "model"
    shutil.copytree(tiny.ensure_tiny_model(), model)
    vae = model / "vae"
    os.rename(vae / "diffusion_pytorch_model.safetensors", vae / "diffusion_pytorch_model-00001-of-00001.safetensors")
    (vae / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": ')  # cut short
    assert decodes_without_diffusers(vae) is False
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(CONFIG, ["sample.steps=2", "parallel.ulysses_degree=1", f"model.path={model}",
                               f"output.path={out}/v.mp4"])
    with pytest.raises(AgreedError, match="VAE"):
        run(cfg, torch.device("cpu"), progress=False)
    assert os.listdir(out) == []


def test_a_wan22_vae_imports_diffusers_piece_by_piece_during_the_denoise(tmp_path):
    # Wan2.2's VAE layout is not vae_decoder.py's: a text-to-video run of TI2V-5B (no image) loads
    # diffusers' AutoencoderKLWan, its import in the main thread one package per step (shadow_load.py)
    from lightx2v_sp.pipeline.shadow_load import VAE_IMPORTS

    cfg = load_config("configs/wan22_ti2v_tiny.yaml", ["parallel.ulysses_degree=1", f"output.path={tmp_path}/v.mp4"])
    result = run(cfg, torch.device("cpu"), progress=False)
    prefetch_summary = result.summary["prefetch"]
    assert prefetch_summary["vae_during_denoise"] is True and result.summary["vae"]["module"] == "AutoencoderKLWan"
    assert list(prefetch_summary["vae_imports_s"]) == list(VAE_IMPORTS)  # every piece ran, in order
    assert prefetch_summary["vae_load_s"] > 0 and (tmp_path / "v.mp4").stat().st_size > 0
