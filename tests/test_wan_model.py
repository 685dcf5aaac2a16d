"""WanModel against diffusers.WanTransformer3DModel on the same weights (single process).

The tiny config, the randomised diffusers reference and the inputs are in helpers.py.
"""
import pytest
import torch

from lightx2v_sp.models.wan import WanConfig, WanModel

from helpers import (ATOL, LATENT, TEXT_LEN, diffusers_forward, diffusers_model, make_inputs, tiny_config,  # noqa: F401
                     token_timesteps)

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = tiny_config()
    ref = diffusers_model(cfg)
    path = tmp_path_factory.mktemp("wan_diffusers")
    ref.save_pretrained(path)
    return cfg, ref, path


def test_matches_diffusers_fp32(reference):
    cfg, ref, path = reference
    model = WanModel.from_pretrained(path)
    x, t, ctx = make_inputs(cfg, batch=2)
    expected = diffusers_forward(ref, x, t, ctx)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero tensors
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_batch_items_are_independent(reference):
    """Sample i of a batch equals the same sample run alone (modulation is per-sample)."""
    cfg, _, path = reference
    model = WanModel.from_pretrained(path)
    x, t, ctx = make_inputs(cfg, batch=2)
    with torch.no_grad():
        both = model(x, t, ctx)
        second = model(x[1:], t[1:], ctx[1:])
    torch.testing.assert_close(both[1:], second, atol=ATOL, rtol=0)


def test_bf16_close_to_fp32_and_keeps_fp32_tables(reference):
    cfg, _, path = reference
    model = WanModel.from_pretrained(path)
    low = WanModel.from_pretrained(path, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in low.named_parameters()}
    assert dtypes["blocks.0.modulation"] == torch.float32 and dtypes["head.modulation"] == torch.float32
    assert dtypes["time_embedding.0.weight"] == torch.float32
    assert dtypes["blocks.0.self_attn.qkv.weight"] == torch.bfloat16
    x, t, ctx = make_inputs(cfg)
    with torch.no_grad():
        ref, out = model(x, t, ctx), low(x, t, ctx)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); a dozen roundings per layer over 2
    # layers give well under 1% relative L2 error (observed 0.55%; diffusers' own bf16 run: 0.57%). 4% flags a real precision bug (e.g. fp16-style
    # overflow or a scale added after rounding), not rounding noise.
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.04, rel


def test_named_configs_match_diffusers_parameter_count():
    from diffusers import WanTransformer3DModel

    for cfg, billions in ((WanConfig.t2v_1_3b(), 1.3), (WanConfig.t2v_14b(), 14.0), (WanConfig.ti2v_5b(), 5.0),
                          (WanConfig.i2v_14b(), 16.4), (WanConfig.i2v_a14b(), 14.3)):
        with torch.device("meta"):
            ours = WanModel(cfg)
            theirs = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
        n_ours = sum(p.numel() for p in ours.parameters())
        n_theirs = sum(p.numel() for p in theirs.parameters())
        assert n_ours == n_theirs
        assert abs(n_ours / 1e9 - billions) / billions < 0.1, n_ours


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        WanConfig(dim=100, num_heads=12)
    with pytest.raises(ValueError, match="only text-to-video"):
        WanConfig(model_type="ti2v")
    with pytest.raises(ValueError, match="noise \\+ 4 mask \\+ image latent channels = 36"):
        WanConfig(model_type="i2v")  # an I2V DiT with T2V's 16 input channels
    assert WanConfig(model_type="i2v", in_dim=36).condition_dim == 20
    with pytest.raises(ValueError, match="unknown Wan config"):
        WanConfig.named("7b")


def test_latent_shape_errors(reference):
    cfg, _, path = reference
    model = WanModel.from_pretrained(path)
    _, t, ctx = make_inputs(cfg)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 16, 2, 5, 6), t, ctx)
    with pytest.raises(ValueError, match=r"latents must be \[B, 16"):
        model(torch.randn(1, 4, 2, 4, 6), t, ctx)


def test_attention_entry_point_is_replaceable(reference):
    """Self-attention goes through `attn_fn` with [B, S, H, D] tensors (parallelize_wan relies on it)."""
    cfg, _, path = reference
    model = WanModel.from_pretrained(path)
    seen = []
    base = model.blocks[0].self_attn.attn_fn

    def spy(q, k, v):
        seen.append(tuple(q.shape))
        return base(q, k, v)

    model.blocks[0].self_attn.attn_fn = spy
    x, t, ctx = make_inputs(cfg)
    with torch.no_grad():
        model(x, t, ctx)
    assert seen == [(1, 175, cfg.num_heads, cfg.head_dim)]


def test_wan21_i2v_clip_branch_matches_diffusers_fp32(tmp_path):
    """Wan2.1 I2V: 36 input channels and CLIP image tokens through img_emb and the k_img/v_img branch.

    diffusers' attention takes the last 512 context tokens as text and the ones before as image
    tokens, so the text context here is 512 long (Wan's text_len)."""
    cfg = tiny_config(model_type="i2v", in_dim=36, image_dim=24)
    ref = diffusers_model(cfg, seed=3)
    ref.save_pretrained(tmp_path / "diffusers")
    model = WanModel.from_pretrained(tmp_path / "diffusers")
    assert model.config.image_dim == 24 and model.config.model_type == "i2v"
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 36, *LATENT[1:], generator=gen)
    t = torch.tensor([900.0, 3.0])
    ctx = torch.randn(2, 512, cfg.text_dim, generator=gen)
    img = torch.randn(2, 9, 24, generator=gen)
    with torch.no_grad():
        expected = ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
        out = model(x, t, ctx, img)
        without_image = ref(x, t, ctx, encoder_hidden_states_image=torch.zeros_like(img), return_dict=False)[0]
    assert (expected - without_image).abs().max() > 0.05  # the image branch matters in this comparison
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    # the official layout (img_emb.proj.*, cross_attn.k_img/v_img/norm_k_img) round-trips, image_dim read off
    # the weights (the official config.json does not carry it)
    model.save_pretrained(tmp_path / "official", layout="official")
    again = WanModel.from_pretrained(tmp_path / "official")
    assert again.config.image_dim == 24
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx, img), out)
    with pytest.raises(ValueError, match="image_context is missing"):
        model(x, t, ctx)


def test_wan22_ti2v_per_token_timesteps_match_diffusers_fp32(tmp_path):
    """Wan2.2 TI2V-5B's DiT: 48 latent channels in and out, one timestep per token (expand_timesteps)."""
    cfg = tiny_config(in_dim=48, out_dim=48)
    ref = diffusers_model(cfg, seed=6)
    ref.save_pretrained(tmp_path)
    model = WanModel.from_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 48, *LATENT[1:], generator=gen)
    t = token_timesteps(torch.tensor([900.0, 125.5]))
    ctx = torch.randn(2, TEXT_LEN, cfg.text_dim, generator=gen)
    expected = diffusers_forward(ref, x, t, ctx)
    with torch.no_grad():
        out = model(x, t, ctx)
        same_t = model(x, t[:, -1:].expand(-1, t.shape[1]), ctx)  # every token at t == one timestep per sample
        per_sample = model(x, t[:, -1], ctx)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(same_t, per_sample, atol=ATOL, rtol=0)
    assert (out - per_sample).abs().max() > 0.05  # the first frame's timestep 0 matters
    with pytest.raises(ValueError, match="per-token timesteps must be"):
        model(x, t[:, 1:], ctx)
