"""The Wan family end to end against diffusers' own pipelines (tiny random weights, fp32, CPU).

diffusers builds and saves the checkpoints: a two-expert `WanPipeline` (Wan2.2 T2V-A14B), a
two-expert `WanImageToVideoPipeline` without an image encoder (Wan2.2 I2V-A14B), and a one-DiT
`WanImageToVideoPipeline` with a CLIP vision tower and the DiT's image branch (Wan2.1 I2V), and a
one-DiT Wan2.2 TI2V pipeline (48 latent channels, the Wan2.2 VAE's shape, expand_timesteps) run as
`WanPipeline` without and `WanImageToVideoPipeline` with an image. Our runner
generates from the saved directories; diffusers' `__call__` generates from the same directories with
the latents our seed draws. Compared: the decoded videos in [0, 1], on 1 process and on 2 and 3 gloo
ranks (Ulysses with uneven token slices, round-robin, CFG-parallel; all kinds in one spawn per rank
count), and the two-expert weights rewritten in the official Wan2.2 layout.
"""
import os
import shutil

import pytest
import torch

from lightx2v_sp.config import load_config
from lightx2v_sp.models import tiny
from lightx2v_sp.models.wan import WanModel
from lightx2v_sp.pipeline import run
from lightx2v_sp.pipeline.latents import initial_latents, latent_shape
from lightx2v_sp.testing import run_on_ranks
from helpers import randomize_

ROOT = os.path.join(os.path.dirname(__file__), "..")
IMAGE = os.path.join(ROOT, "assets", "images", "tiny_first_frame.png")
PROMPT, NEGATIVE = "a small cat walks on the grass", "blurry low quality"
# 48 x 80 pixels, 9 frames -> latents 3 x 6 x 10 -> 3 x 3 x 5 = 45 tokens: uneven over 2 ranks.
# 3 UniPC steps at shift 3 are the timesteps 999, 857, 600: the boundaries 0.875 (T2V) and 0.9 (I2V)
# give the high-noise expert one step and the low-noise expert two, with different guidance scales.
SIZE = dict(height=48, width=80, num_frames=9)
# TI2V: 16x VAE, 2x2 patches -> multiples of 32; 96 x 96 -> latents 3 x 6 x 6 -> 27 tokens (14/13 on 2
# ranks, so the first frame's 9 tokens at timestep 0 sit on rank 0 next to tokens at t)
SIZE_TI2V = dict(height=96, width=96, num_frames=9)
STEPS, SHIFT, SEED, TEXT_LEN = 3, 3.0, 7, 32
# Wan2.1 I2V: diffusers' attention takes the last 512 context tokens as text and the ones before as
# image tokens, so that kind runs with Wan's text_len of 512.
KINDS = {
    "t2v": dict(config="wan22_t2v_tiny.yaml", boundary=0.875, in_dim=16, guidance=(4.0, 2.5), text_len=TEXT_LEN),
    "i2v": dict(config="wan22_i2v_tiny.yaml", boundary=0.9, in_dim=36, guidance=(3.5, 2.0), text_len=TEXT_LEN),
    "i2v_clip": dict(config="wan22_i2v_tiny.yaml", boundary=None, in_dim=36, guidance=(4.0, None), text_len=512),
    "ti2v": dict(config="wan22_ti2v_tiny.yaml", boundary=None, in_dim=48, guidance=(4.0, None), text_len=TEXT_LEN,
                 size=SIZE_TI2V, image=False),
    "ti2v_image": dict(config="wan22_ti2v_tiny.yaml", boundary=None, in_dim=48, guidance=(4.0, None),
                       text_len=TEXT_LEN, size=SIZE_TI2V, same_dir_as="ti2v"),
}
for _spec in KINDS.values():
    _spec.setdefault("size", SIZE)
    _spec.setdefault("image", _spec["in_dim"] != 16)
KIND_NAMES = {"t2v": "wan2.2-t2v-a14b", "i2v": "wan2.2-i2v-a14b", "i2v_clip": "wan2.1-i2v", "ti2v": "wan2.2-ti2v-5b",
              "ti2v_image": "wan2.2-ti2v-5b"}
TWO_EXPERTS = [k for k in KINDS if KINDS[k]["boundary"] is not None]
CLIP = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)  # 16 patches + the class token = 17 image tokens of width 24
# 6 heads (Ulysses 2 and 3), 2 layers; the two experts get different random weights.
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=16, text_dim=64, freq_dim=32,
           ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
           out_channels=16, rope_max_seq_len=1024)
VARIANTS_2 = {
    "ulysses2_rr_unfused": ["parallel.ulysses_degree=2", "parallel.a2a=round_robin", "parallel.fuse_qkv=false"],
    "cfg2": ["parallel.ulysses_degree=1", "parallel.cfg_degree=2"],
}
VARIANTS_3 = {"ulysses3": ["parallel.ulysses_degree=3"]}
# Tolerance: both sides run the same fp32 math in a different operation order (fused QKV, patch
# embedding as a GEMM, our UMT5 vs transformers', z * std vs z / (1 / std) before the decode), so
# each op differs by a few fp32 ulps; through 3 guided steps (scales up to 4 amplify cond - uncond)
# and the VAE decoder that stays ~1e-6 (observed max |diff| below 1e-5, see the assertion messages).
# The bar is a mean |difference| below 1e-3 of the [0, 1] range; we also bound the max by
# 1e-4. A wrong expert, boundary, mask or image layout moves pixels by O(0.01-0.1).
MEAN_TOL, MAX_TOL = 1e-3, 1e-4


def _tokenizer_and_encoder(path):
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    tiny._write_tokenizer(str(path / "tok"))
    torch.manual_seed(1)
    t5 = tiny.TINY_T5
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=t5["vocab_size"], d_model=t5["d_model"], d_kv=t5["d_kv"],
                                          num_heads=t5["num_heads"], d_ff=t5["d_ff"], num_layers=t5["num_layers"],
                                          feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    return AutoTokenizer.from_pretrained(str(path / "tok")), encoder


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    # the settings of Wan's -Diffusers scheduler_config.json, which lightx2v_sp.pipeline.scheduler uses
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=SHIFT, solver_order=2, solver_type="bh2", lower_order_final=True,
                                   final_sigmas_type="zero")


def _clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(CLIPVisionConfig(**CLIP)).eval(), processor


def build_pipeline(kind: str, path):
    """A tiny diffusers pipeline of `kind`, saved by diffusers to `path`."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    spec = KINDS[kind]
    tokenizer, encoder = _tokenizer_and_encoder(path)
    torch.manual_seed(2)
    vae = AutoencoderKLWan(**tiny.TINY_VAE).eval()
    parts = dict(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=_scheduler())
    if kind == "ti2v":
        torch.manual_seed(2)
        gen = torch.Generator().manual_seed(5)  # non-trivial latent statistics for the 48 channels
        vae = AutoencoderKLWan(**tiny.TINY_VAE22, latents_mean=(0.3 * torch.randn(48, generator=gen)).tolist(),
                               latents_std=(1 + torch.rand(48, generator=gen)).tolist()).eval()
        dit = randomize_(WanTransformer3DModel(**dict(DIT, out_channels=48), in_channels=48), seed=13).eval()
        pipe = WanPipeline(**dict(parts, vae=vae), transformer=dit, expand_timesteps=True)
    elif kind == "i2v_clip":
        clip, processor = _clip()
        inner = DIT["num_attention_heads"] * DIT["attention_head_dim"]
        dit = WanTransformer3DModel(**DIT, in_channels=36, image_dim=CLIP["hidden_size"], added_kv_proj_dim=inner)
        pipe = WanImageToVideoPipeline(**parts, image_processor=processor, image_encoder=clip,
                                       transformer=randomize_(dit, seed=12).eval())
    else:
        experts = [randomize_(WanTransformer3DModel(**DIT, in_channels=spec["in_dim"]), seed=10 + i).eval()
                   for i in range(2)]
        parts.update(transformer=experts[0], transformer_2=experts[1], boundary_ratio=spec["boundary"])
        pipe = WanPipeline(**parts) if kind == "t2v" else WanImageToVideoPipeline(**parts, image_encoder=None,
                                                                                  image_processor=None)
    pipe.save_pretrained(str(path / "pipe"))
    shutil.rmtree(path / "tok")
    return pipe


@torch.no_grad()
def diffusers_video(kind: str, pipe) -> torch.Tensor:
    """diffusers' video [3, F, H, W] in [0, 1] from the latents our seed draws."""
    from PIL import Image

    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    # diffusers' I2V module calls ftfy unguarded (its T2V twin checks is_ftfy_available); ftfy is not
    # installed here, and for our plain ASCII prompt both cleaners return it unchanged.
    pipeline_wan_i2v.prompt_clean = pipeline_wan.prompt_clean
    spec = KINDS[kind]
    size, vae = spec["size"], pipe.vae.config
    latents = initial_latents(SEED, latent_shape(vae.z_dim, size["num_frames"], size["height"], size["width"],
                                                 vae.scale_factor_temporal, vae.scale_factor_spatial))
    extra = {"image": Image.open(IMAGE).convert("RGB")} if spec["image"] else {}
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, **size, num_inference_steps=STEPS,
               guidance_scale=spec["guidance"][0], guidance_scale_2=spec["guidance"][1], latents=latents,
               output_type="pt", max_sequence_length=spec["text_len"], **extra).frames  # [1, F, 3, H, W]
    return out[0].permute(1, 0, 2, 3).float()


def our_config(kind: str, path: str, out: str, extra=()):
    spec = KINDS[kind]
    image = [f"image={IMAGE}", "sample.image_resize=stretch"] if spec["image"] else []
    size = spec["size"]
    scale_2 = "null" if spec["guidance"][1] is None else spec["guidance"][1]
    return load_config(os.path.join(ROOT, "configs", spec["config"]), [
        f"model.path={path}", "model.dtype=fp32", f"prompt={PROMPT}", f"negative_prompt={NEGATIVE}",
        f"seed={SEED}", f"sample.steps={STEPS}", f"sample.shift={SHIFT}", f"sample.height={size['height']}",
        f"sample.width={size['width']}", f"sample.num_frames={size['num_frames']}",
        f"sample.guidance_scale={spec['guidance'][0]}", f"sample.guidance_scale_2={scale_2}",
        "sample.boundary_ratio=null", f"text_encoder.text_len={spec['text_len']}", f"output.path={out}", "device=cpu",
        *image, *extra])


def our_video(kind: str, path: str, out: str, extra=()):
    res = run(our_config(kind, path, out, extra), torch.device("cpu"), progress=False, keep_video=True)
    return None if res.video is None else (res.video + 1) / 2, res.summary


def official_copy(src, dst) -> str:
    """The diffusers-saved pipeline rewritten in the official Wan2.2 A14B layout (same weights)."""
    for sub in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))
    for diffusers_dir, official_dir in (("transformer", "high_noise_model"), ("transformer_2", "low_noise_model")):
        WanModel.from_pretrained(os.path.join(src, diffusers_dir)).save_pretrained(
            os.path.join(dst, official_dir), layout="official")
    return str(dst)


def _ranks(rank, world, dirs, outdir, variants):
    results = {}
    for kind, path in dirs.items():
        for name, extra in variants.items():
            video, _ = our_video(kind, path, f"{outdir}/{kind}_{name}_{world}.mp4", extra)
            results[f"{kind}/{name}"] = video
    return results


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("wan22")
    dirs, reference, single = {}, {}, {}
    for kind, spec in KINDS.items():
        if "same_dir_as" in spec:  # the same saved weights, run by diffusers' I2V pipeline with an image
            from diffusers import WanImageToVideoPipeline

            pipe = WanImageToVideoPipeline(**{k: v for k, v in pipe.components.items() if k != "transformer_2"},
                                           image_encoder=None, image_processor=None, expand_timesteps=True)
            dirs[kind] = dirs[spec["same_dir_as"]]
        else:
            pipe = build_pipeline(kind, base / kind)
            dirs[kind] = str(base / kind / "pipe")
        reference[kind] = diffusers_video(kind, pipe)
        single[kind] = our_video(kind, dirs[kind], str(base / f"{kind}_single.mp4"))
    return base, dirs, reference, single


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    size = KINDS[what.split(",")[0]]["size"]
    assert ours.shape == theirs.shape == (3, size["num_frames"], size["height"], size["width"]), what
    diff = (ours - theirs).abs()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, f"{what}: mean {diff.mean():.2e} max {diff.max():.2e}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_single_process_matches_diffusers(setup, kind):
    _, _, reference, single = setup
    video, summary = single[kind]
    # not a degenerate video that any output would match: varied and mostly unclipped
    assert reference[kind].std() > 0.05 and ((reference[kind] > 0.01) & (reference[kind] < 0.99)).float().mean() > 0.5
    _close(video, reference[kind], f"{kind}, 1 process")
    if kind in TWO_EXPERTS:
        assert summary["experts"] == {"kind": KIND_NAMES[kind], "boundary_source": "model_index.json",
                                      "num_experts": 2, "guidance_scales": list(KINDS[kind]["guidance"]),
                                      "boundary_timestep": KINDS[kind]["boundary"] * 1000, "switches": 1}
    else:
        assert summary["experts"]["kind"] == KIND_NAMES[kind] and summary["experts"]["num_experts"] == 1
    assert ("image" in summary["stage_times_s"]) == KINDS[kind]["image"]


def test_experts_and_image_matter(setup):
    """Guard against a comparison that cannot fail: the low-noise expert, its guidance scale and the
    image each change the video by far more than the tolerance. Observed max |change|: 0.78 (no
    low-noise expert), 0.085 (its guidance 2.5 -> 4), 0.006 (the image cropped instead of stretched:
    random weights give the latent image a small but clear say), 0.41 (Wan2.1 I2V: the CLIP tokens
    zeroed; mean 0.044); parity differences are ~1.7e-6."""
    from lightx2v_sp.pipeline import conditioning

    base, dirs, reference, _ = setup
    for kind, extra in [("t2v", ["sample.boundary_ratio=0.0"]), ("t2v", ["sample.guidance_scale_2=4.0"]),
                        ("i2v", ["sample.image_resize=crop"])]:
        video, _ = our_video(kind, dirs[kind], str(base / "changed.mp4"), extra)
        assert (video - reference[kind]).abs().max() > 10 * MAX_TOL, (kind, extra)
    real = conditioning.encode_clip
    conditioning.encode_clip = lambda *a, **k: torch.zeros_like(real(*a, **k))
    try:
        video, _ = our_video("i2v_clip", dirs["i2v_clip"], str(base / "changed.mp4"), ["image_encoder.device=cpu"])
    finally:
        conditioning.encode_clip = real
    assert (video - reference["i2v_clip"]).abs().mean() > 10 * MEAN_TOL
    # TI2V: the image as first latent frame changes the video (ours matches diffusers with and without it)
    assert (reference["ti2v_image"] - reference["ti2v"]).abs().mean() > 10 * MEAN_TOL


def test_official_layout_matches(setup, tmp_path):
    _, dirs, reference, _ = setup
    for kind in TWO_EXPERTS:
        path = official_copy(dirs[kind], tmp_path / kind)
        video, summary = our_video(kind, path, str(tmp_path / f"{kind}.mp4"))
        # the official files carry no boundary: the Wan2.2 release's (0.875 T2V, 0.9 I2V) = the ones saved above
        assert summary["experts"]["boundary_source"].startswith("Wan2.2 release default")
        _close(video, reference[kind], f"{kind}, official layout")


@pytest.mark.parametrize("world,variants", [(2, VARIANTS_2), (3, VARIANTS_3)], ids=["2ranks", "3ranks"])
def test_ranks_match_diffusers(setup, world, variants):
    base, dirs, reference, _ = setup
    ranks = run_on_ranks(_ranks, world, dirs, str(base), variants, timeout=240)
    for kind in KINDS:
        for name in variants:
            assert all(r[f"{kind}/{name}"] is None for r in ranks[1:])  # only rank 0 decodes
            _close(ranks[0][f"{kind}/{name}"], reference[kind], f"{kind}, {name} on {world} ranks")
