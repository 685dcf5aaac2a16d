"""Two-expert and image-input pieces: image checks and fitting, kind detection, input errors
(one error before any compute), and expert switching under offload (swap / block) on CPU."""
import gc
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from lightx2v_sp.config import load_config
from lightx2v_sp.distributed import ParallelDims
from lightx2v_sp.models import tiny
from lightx2v_sp.offload import HostTransport
from lightx2v_sp.pipeline import AgreedError, run
from lightx2v_sp.pipeline.denoise import denoise
from lightx2v_sp.pipeline.experts import install_experts, load_experts
from lightx2v_sp.pipeline.image import first_frame_mask, fit_image, open_image
from lightx2v_sp.pipeline.kind import detect_kind
from lightx2v_sp.pipeline.latents import initial_latents
from lightx2v_sp.pipeline.paths import resolve_model_paths
from lightx2v_sp.pipeline.text import TextContexts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
I2V = os.path.join(ROOT, "configs", "wan22_i2v_tiny.yaml")
T2V = os.path.join(ROOT, "configs", "wan22_t2v_tiny.yaml")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    for variant in ("wan2.1-t2v", "wan2.1-i2v", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"):
        tiny.ensure_tiny_model(path, variant)
    return path


def _cfg(config, cache, tmp_path, *extra):
    os.environ["LIGHTX2V_SP_CACHE"] = cache
    return load_config(config, [f"output.path={tmp_path}/v.mp4", "device=cpu", "sample.steps=2", *extra])


# --- image file checks and fitting -------------------------------------------------------------
def test_open_image_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_image(str(tmp_path / "none.png"))
    with pytest.raises(ValueError, match="is a directory"):
        open_image(str(tmp_path))
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        open_image(str(tmp_path / "junk.png"))
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    with pytest.raises(ValueError, match="has mode 'I;16'.*only 8-bit images"):
        open_image(str(tmp_path / "deep.png"))
    Image.new("RGBA", (8, 4), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    img = open_image(str(tmp_path / "alpha.png"))  # alpha dropped, as Wan's loader does
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_exif_orientation_is_applied(tmp_path, ext):
    """A phone portrait is stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to view);
    the frame must come out upright, as diffusers' load_image (ImageOps.exif_transpose) gives it."""
    from diffusers.utils import load_image

    stored = np.zeros((32, 48, 3), dtype=np.uint8)  # 48 wide, 32 high; left third white
    stored[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = str(tmp_path / f"phone.{ext}")
    Image.fromarray(stored).save(path, exif=exif)
    img = open_image(path)
    assert img.size == (32, 48)  # upright: portrait
    upright = np.asarray(img)
    # rotated clockwise, the stored left third becomes the top third
    assert upright[:14].min() > 200 and upright[18:].max() < 50
    assert np.array_equal(upright, np.asarray(load_image(path)))


def test_fit_image_stretch_is_diffusers_and_crop_keeps_the_centre():
    from diffusers.video_processor import VideoProcessor

    # 2:1 image: left quarter red, middle half green, right quarter blue
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :20, 0], pixels[:, 20:60, 1], pixels[:, 60:, 2] = 255, 255, 255
    img = Image.fromarray(pixels)
    theirs = VideoProcessor(vae_scale_factor=8).preprocess(img, height=32, width=48)
    torch.testing.assert_close(fit_image(img, 32, 48, "stretch"), theirs, atol=0, rtol=0)
    square = fit_image(img, 32, 32, "crop")
    assert square.shape == (1, 3, 32, 32)
    # the centred square (x 20..60) is all green: red and blue stay out but for Lanczos ringing at the edges
    inner = square[0, :, :, 2:-2]
    assert (inner[1] > 0.95).all() and (inner[[0, 2]] < -0.95).all()


def test_first_frame_mask():
    mask = first_frame_mask(3, 2, 5)
    assert mask.shape == (1, 4, 3, 2, 5)
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()


# --- kind detection and input errors -----------------------------------------------------------
def test_detect_kind_official_and_diffusers(cache, tmp_path):
    t2v = detect_kind(resolve_model_paths(tiny.tiny_model_dir(cache, "wan2.2-t2v-a14b")))
    assert (t2v.name, t2v.image_input, t2v.boundary_ratio) == ("wan2.2-t2v-a14b", False, 0.875)
    assert [os.path.basename(d) for d in t2v.experts] == ["high_noise_model", "low_noise_model"]
    i2v = detect_kind(resolve_model_paths(tiny.tiny_model_dir(cache, "wan2.2-i2v-a14b")))
    assert (i2v.name, i2v.image_input, i2v.boundary_ratio) == ("wan2.2-i2v-a14b", True, 0.9)
    one = detect_kind(resolve_model_paths(tiny.tiny_model_dir(cache)))
    assert (one.name, one.experts, one.boundary_ratio) == ("wan2.1-t2v", (tiny.tiny_model_dir(cache),), None)
    clip = detect_kind(resolve_model_paths(tiny.tiny_model_dir(cache, "wan2.1-i2v")))
    assert (clip.name, clip.image_input, clip.image_dim) == ("wan2.1-i2v", True, tiny.TINY_CLIP["hidden_size"])
    assert os.path.basename(clip.image_encoder) == "image_encoder"

    # a diffusers pipeline directory that names transformer_2 but lacks it
    src = tiny.tiny_model_dir(cache, "wan2.2-t2v-a14b")
    root = tmp_path / "diffusers"
    root.mkdir()
    for sub in ("text_encoder", "tokenizer", "vae"):
        os.symlink(os.path.join(src, sub), root / sub)
    from lightx2v_sp.models.wan import WanModel
    WanModel.from_pretrained(os.path.join(src, "high_noise_model")).save_pretrained(root / "transformer",
                                                                                  layout="diffusers")
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing: the low-noise expert"):
        resolve_model_paths(str(root))
    WanModel.from_pretrained(os.path.join(src, "low_noise_model")).save_pretrained(root / "transformer_2",
                                                                                 layout="diffusers")
    assert detect_kind(resolve_model_paths(str(root))).boundary_ratio == 0.875
    (root / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ValueError, match="expand_timesteps=true, but its DiT is not one TI2V DiT"):
        detect_kind(resolve_model_paths(str(root)))


@pytest.mark.parametrize("config,extra,message", [
    (I2V, ["image=/no/such/frame.png"], "image=/no/such/frame.png does not exist"),
    (I2V, ["image=null"], "is image-to-video .* needs image=path"),
    (os.path.join(ROOT, "configs", "wan21_i2v_tiny.yaml"), ["image=/no/such/frame.png"], "does not exist"),
    (T2V, [f"image={os.path.join(ROOT, 'assets', 'images', 'tiny_first_frame.png')}"], "is text-to-video"),
    (os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml"), ["sample.guidance_scale_2=3.0"], "has one DiT"),
], ids=["missing", "none-for-i2v", "missing-clip-i2v", "image-for-t2v", "expert-setting-for-one-dit"])
def test_input_errors_stop_in_preflight(cache, tmp_path, config, extra, message):
    with pytest.raises(AgreedError, match=message):
        run(_cfg(config, cache, tmp_path, *extra), torch.device("cpu"), progress=False)
    assert not os.path.exists(tmp_path / "v.mp4")


def test_cli_missing_image_is_one_error_line(cache, tmp_path):
    env = dict(os.environ, LIGHTX2V_SP_CACHE=cache, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "lightx2v_sp.generate", "--config", I2V, "image=missing.png",
                        f"output.path={tmp_path}/v.mp4"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and errors == ["error: image=missing.png does not exist; image-to-video needs its "
                                            "first frame"], r.stderr
    assert "Traceback" not in r.stderr and not os.listdir(tmp_path)


# --- expert switching under offload ------------------------------------------------------------
@pytest.mark.parametrize("offload", ["swap", "block"])
def test_offloaded_experts_switch_bit_identically(cache, tmp_path, offload):
    """The swap placement and block offload (real schedulers on a HostTransport: copies on the CPU)
    give the same bits as resident experts: placement moves weights, never changes them."""
    path = tiny.tiny_model_dir(cache, "wan2.2-t2v-a14b")
    kind = detect_kind(resolve_model_paths(path))
    gen = torch.Generator().manual_seed(0)
    text_dim = tiny.TINY_WAN["text_dim"]
    contexts = TextContexts(cond=torch.randn(1, 8, text_dim, generator=gen),
                            uncond=torch.randn(1, 8, text_dim, generator=gen), num_tokens=[8, 8])
    latents0 = initial_latents(3, (16, 3, 4, 6))
    out = {}
    for mode in ("none", offload):
        cfg = _cfg(T2V, cache, tmp_path, "sample.steps=4", f"offload.dit={mode}")
        models = load_experts(kind.experts, cfg, torch.device("cpu"), torch.float32)
        experts = install_experts(models, cfg, ParallelDims(), torch.device("cpu"), kind.boundary_ratio,
                                  transport=HostTransport() if mode != "none" else None)
        out[mode] = denoise(experts, latents0, contexts, cfg, ParallelDims(), show_progress=False)
        assert experts.num_switches == 1 and experts.active == 1  # 999, 900 high-noise; 750, 500 low-noise
        if mode == "swap":
            assert all(p.swaps for p in experts.placements)
        if mode == "block":
            assert all(h.active and h.num_copies > 0 for h in experts.block_offloads)
        experts.release()
    assert torch.equal(out["none"], out[offload])


class _NumpyHost(HostTransport):
    """Host copies in numpy arrays, so a weakref tells when the memory itself (not a tensor object) is freed:
    torch.from_numpy's storage holds its array until the last tensor viewing it dies."""

    def __init__(self):
        super().__init__()
        self.arrays = []

    def host_empty(self, nbytes):
        array = np.empty(nbytes, dtype=np.uint8)
        self.arrays.append(weakref.ref(array))
        return torch.from_numpy(array)


@pytest.mark.parametrize("offload", ["block", "swap"])
def test_host_copies_are_freed_when_the_denoise_ends(cache, tmp_path, offload):
    """The runner's experts.release() ends the DiT's use: block offload's forward hooks hold the handle, which
    holds the host blocks, so without releasing them the pinned copy lived on through decode and write."""
    path = tiny.tiny_model_dir(cache, "wan2.2-t2v-a14b")
    kind = detect_kind(resolve_model_paths(path))
    text_dim = tiny.TINY_WAN["text_dim"]
    contexts = TextContexts(cond=torch.randn(1, 8, text_dim), uncond=torch.randn(1, 8, text_dim), num_tokens=[8, 8])
    cfg = _cfg(T2V, cache, tmp_path, f"offload.dit={offload}")
    transport = _NumpyHost()
    models = load_experts(kind.experts, cfg, torch.device("cpu"), torch.float32)
    experts = install_experts(models, cfg, ParallelDims(), torch.device("cpu"), kind.boundary_ratio,
                              transport=transport)
    denoise(experts, initial_latents(3, (16, 3, 4, 6)), contexts, cfg, ParallelDims(), show_progress=False)
    assert len(transport.arrays) == (2 * tiny.TINY_WAN["num_layers"] if offload == "block" else 2)
    gc.disable()  # only reference counts may free them: a collection would hide a cycle
    try:
        experts.release()
        if offload == "block":  # freed at release, though the models are still referenced
            assert all(ref() is None for ref in transport.arrays)
        del models, experts
        assert all(ref() is None for ref in transport.arrays)
    finally:
        gc.enable()


def test_official_wan21_i2v_is_refused_with_the_way_out(cache, tmp_path):
    """Official Wan2.1 I2V keeps CLIP as an open_clip .pth, which we do not read: a clear error."""
    from lightx2v_sp.models.wan import WanModel

    src = tiny.tiny_model_dir(cache, "wan2.1-i2v")
    for sub in ("text_encoder", "tokenizer", "vae"):
        os.symlink(os.path.join(src, sub), tmp_path / sub)
    WanModel.from_pretrained(os.path.join(src, "transformer")).save_pretrained(tmp_path, layout="official")
    with pytest.raises(ValueError, match="open_clip checkpoint .* use the -Diffusers layout"):
        detect_kind(resolve_model_paths(str(tmp_path)))


def test_heads_check_for_ti2v_24_heads():
    """TI2V-5B has 24 heads: on 8 GPUs both cfg 2 x ulysses 4 and ulysses 8 split them (24 = 8 x 3); on 16
    ranks ulysses 16 cannot, and the error lists the layouts that work."""
    from lightx2v_sp.models.wan import WanConfig
    from lightx2v_sp.distributed import check_layout

    heads = WanConfig.ti2v_5b().num_heads
    assert heads == 24
    check_layout(8, 4, 2, heads)
    check_layout(8, 8, 1, heads)
    with pytest.raises(ValueError, match="24 attention heads cannot be split over a Ulysses group of 16 \\(parallel.ulysses_degree=16\\); "
                                         "layouts that work on 16 rank\\(s\\): cfg_degree=2 x ulysses_degree=8"):
        check_layout(16, 16, 1, heads)


def test_ti2v_inputs(cache, tmp_path):
    """TI2V takes an image or not; its size must fit the 16x VAE and 2x2 patches; the official layout
    (Wan2.2_VAE.pth) is refused with the way out."""
    config = os.path.join(ROOT, "configs", "wan22_ti2v_tiny.yaml")
    with pytest.raises(AgreedError, match="must be multiples of 32"):
        run(_cfg(config, cache, tmp_path, "sample.height=80"), torch.device("cpu"), progress=False)
    with pytest.raises(AgreedError, match="does not exist"):
        run(_cfg(config, cache, tmp_path, "image=/no/such.png"), torch.device("cpu"), progress=False)
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text(json.dumps({"dim": 96, "num_heads": 12, "model_type": "ti2v"}))
    (official / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    src = tiny.tiny_model_dir(cache, "wan2.2-ti2v-5b")
    for sub in ("text_encoder", "tokenizer", "vae"):
        os.symlink(os.path.join(src, sub), official / sub)
    with pytest.raises(ValueError, match="Wan2.2_VAE.pth is not supported; use the -Diffusers layout"):
        detect_kind(resolve_model_paths(str(official)))
