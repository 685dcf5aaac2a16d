"""Pipeline pieces in isolation: atomic output, writability checks, guidance, scheduler, latents, layout check."""
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from lightx2v_sp.config import load_config
from lightx2v_sp.distributed import ParallelDims
from lightx2v_sp.models import tiny
from lightx2v_sp.pipeline import output, run
from lightx2v_sp.distributed import check_layout, resolve_ulysses_degree
from lightx2v_sp.pipeline.checks import AgreedError, agreed
from lightx2v_sp.pipeline.guidance import combine, guided_prediction
from lightx2v_sp.pipeline.latents import initial_latents, latent_shape
from lightx2v_sp.pipeline.scheduler import make_scheduler


def _frames(n=5, h=32, w=48):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_write_video_roundtrip(tmp_path):
    path = str(tmp_path / "a.mp4")
    output.write_video(_frames(), path, fps=8)
    back = imageio.mimread(path)
    assert len(back) == 5 and back[0].shape == (32, 48, 3)
    assert os.listdir(tmp_path) == ["a.mp4"]


def test_output_quality_sets_the_crf_and_is_validated(tmp_path):
    # output.quality is imageio's scale: a lower quality is a higher x264 crf, so fewer bytes and a
    # larger error for the same frames. Random colours in 4x4 blocks lose ~4 levels to yuv420p's chroma
    # subsampling at any crf (4.1 at quality 10 here); crf 10 adds little to that, crf 25 about as much again.
    smooth = np.repeat(np.repeat(_frames(9, 8, 12), 4, axis=1), 4, axis=2)  # 9 x 32 x 48
    sizes, errors = {}, {}
    for quality in (8, 5):
        path = str(tmp_path / f"q{quality}.mp4")
        output.write_video(smooth, path, fps=8, quality=quality)
        sizes[quality] = os.path.getsize(path)
        back = np.stack(imageio.mimread(path)).astype(np.int16)
        assert back.shape == smooth.shape
        errors[quality] = float(np.abs(back - smooth).mean())
    assert sizes[5] < 0.8 * sizes[8], sizes  # 4356 vs 6996 bytes here
    assert errors[8] < 5 and errors[8] < errors[5] < 12, errors  # 4.3 and 7.7 levels here
    assert load_config(None, ["output.quality=5"]).output.quality == 5
    for bad in (0, 10):  # 10: x264's lossless mode, a profile most players refuse
        with pytest.raises(ValueError, match="output.quality"):
            load_config(None, [f"output.quality={bad}"])


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"old video")
    real = imageio.get_writer

    def failing_writer(*args, **kwargs):
        w = real(*args, **kwargs)
        append, count = w.append_data, [0]

        def append_data(frame):
            count[0] += 1
            if count[0] == 3:
                raise OSError("disk full")
            append(frame)

        w.append_data = append_data
        return w

    monkeypatch.setattr(imageio, "get_writer", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        output.write_video(_frames(), str(path), fps=8)
    assert path.read_bytes() == b"old video"  # untouched: the new file never replaced it
    assert os.listdir(tmp_path) == ["a.mp4"]  # and the temporary file is gone
    with pytest.raises(ValueError, match="uint8"):
        output.write_video(_frames().astype(np.float32), str(path), fps=8)


def test_write_json_atomic(tmp_path):
    path = str(tmp_path / "s.json")
    output.write_json({"a": 1, "t": torch.float32}, path)
    assert open(path).read().startswith("{")
    with pytest.raises(TypeError):  # a key JSON cannot hold fails mid-write: the old file stays
        output.write_json({1j: 0}, path)
    assert os.listdir(tmp_path) == ["s.json"] and '"a": 1' in open(path).read()


def test_check_writable(tmp_path):
    ok = output.check_writable(str(tmp_path / "new" / "dir" / "v.mp4"))
    assert ok == str(tmp_path / "new" / "dir" / "v.mp4") and os.path.isdir(tmp_path / "new" / "dir")
    assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is removed
    with pytest.raises(ValueError, match="is a directory"):
        output.check_writable(str(tmp_path / "new"))
    with pytest.raises(ValueError, match="must end with .mp4"):
        output.check_writable(str(tmp_path / "v.gif"))
    with pytest.raises(ValueError, match="not writable"):
        output.check_writable("/proc/lightx2v_sp/v.mp4")
    assert output.summary_path("/x/y/video.mp4") == "/x/y/video.json"


def test_guidance_passes():
    calls = []

    def forward(ctx):
        calls.append(ctx)
        return ctx * 2

    single = ParallelDims()
    cond, uncond = torch.ones(1, 2), torch.zeros(1, 2)
    out = guided_prediction(forward, cond, uncond, 1.0, single)
    assert len(calls) == 1 and torch.equal(out, cond * 2)  # guidance 1.0: no unconditional pass
    calls.clear()
    out = guided_prediction(forward, cond, uncond, 5.0, single)
    assert [c is cond for c in calls] == [True, False] and torch.equal(out, torch.full((1, 2), 10.0))
    c, u = torch.tensor([3.0]), torch.tensor([1.0])
    assert combine(c.half(), u.half(), 4.0).dtype == torch.float32 and combine(c, u, 4.0).item() == 9.0


def test_guidance_at_or_below_one_is_off_like_diffusers(tmp_path):
    """guidance_scale <= 1 (0 here) runs the conditional pass only, as diffusers does: the same latents as
    guidance 1, one DiT forward per step, no negative prompt encoded, and the summary says so."""
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
    runs = {}
    for scale in ("1", "0"):
        cfg = load_config(config, ["sample.steps=2", "parallel.ulysses_degree=1", f"sample.guidance_scale={scale}",
                                   f"output.path={tmp_path}/g{scale}.mp4"])
        runs[scale] = run(cfg, torch.device("cpu"), progress=False)
    off = runs["0"].summary  # with guidance (5.0) the same run makes 4 forwards: test_summary_fields et al.
    assert torch.equal(runs["0"].latents, runs["1"].latents)
    assert off["denoise"]["dit_forwards"] == 2 and off["denoise"]["classifier_free_guidance"] is False
    assert len(off["text"]["prompt_tokens"]) == 1  # the negative prompt was not encoded


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_scheduler(name):
    s = make_scheduler(name, 6, 3.0)
    assert len(s.timesteps) == 6 and float(s.timesteps[0]) >= 990
    other = make_scheduler(name, 6, 8.0)
    assert float(other.timesteps[2]) > float(s.timesteps[2])  # larger shift keeps more noise longer
    x = torch.randn(1, 4, 1, 2, 2)
    for t in s.timesteps:  # a zero velocity leaves the sample unchanged: a flow-matching sampler
        x2 = s.step(torch.zeros_like(x), t, x, return_dict=False)[0]
    assert torch.allclose(x2, x)
    with pytest.raises(ValueError, match="sample.steps"):
        make_scheduler(name, 0, 3.0)
    with pytest.raises(ValueError, match="sample.shift"):
        make_scheduler(name, 4, 0.0)


def test_latents_depend_only_on_the_seed():
    shape = latent_shape(16, 9, 64, 64)
    assert shape == (16, 3, 8, 8)
    a = initial_latents(7, shape)
    torch.manual_seed(123)  # the global RNG plays no part
    torch.randn(100)
    assert torch.equal(initial_latents(7, shape), a) and a.dtype == torch.float32
    assert not torch.equal(initial_latents(8, shape), a)
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_shape(16, 10, 64, 64)


def test_check_layout_messages():
    check_layout(8, 4, 2, 12)
    with pytest.raises(ValueError, match="cfg_degree=2 x ulysses_degree=4"):
        check_layout(8, 8, 1, 12)  # 12 heads do not split 8 ways: the message lists what works
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 4"):
        check_layout(1, 2, 2, 12)


def test_ulysses_degree_zero_means_all_remaining_ranks():
    assert resolve_ulysses_degree(8, 0, 2) == 4 and resolve_ulysses_degree(8, 0, 1) == 8
    assert resolve_ulysses_degree(1, 0, 1) == 1 and resolve_ulysses_degree(8, 2, 2) == 2


def test_agreed_single_process():
    assert agreed("x", lambda: 3) == 3
    with pytest.raises(AgreedError, match="bad value"):
        agreed("x", lambda: (_ for _ in ()).throw(ValueError("bad value")))
    with pytest.raises(AgreedError, match="x failed on rank 0: RuntimeError: boom") as err:
        agreed("x", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert err.value.internal  # not the user's fault: generate exits 1, not 2


def test_run_that_fails_late_writes_nothing(tmp_path, monkeypatch):
    """A failure after denoising (here: in the VAE decode) leaves neither a video nor a summary."""
    from lightx2v_sp.models.vae import WanVAE
    from lightx2v_sp.pipeline import runner

    monkeypatch.setenv("LIGHTX2V_SP_CACHE", str(tmp_path / "cache"))
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
    out = tmp_path / "out" / "v.mp4"
    cfg = load_config(config, ["sample.steps=1", "parallel.ulysses_degree=1", f"output.path={out}"])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the VAE")

    monkeypatch.setattr(WanVAE, "decode", broken)
    with pytest.raises(AgreedError, match="out of memory in the VAE"):
        runner.run(cfg, torch.device("cpu"), progress=False)
    assert os.listdir(out.parent) == []
    assert tiny.is_built(tiny.tiny_model_dir(str(tmp_path / "cache")))
