"""vae_decoder.WanVAEDecoder (no diffusers) against diffusers' AutoencoderKLWan on the same weights:
decode equal bit for bit (no tolerance: the same operations in the same order, so any difference
is a different computation), for a diffusers directory and the official .pth, in fp32 and bf16,
whole and in row bands; other layouts keep loading as AutoencoderKLWan."""
import os

import pytest
import torch
from diffusers import AutoencoderKLWan

from lightx2v_sp.models import vae as vae_mod
from lightx2v_sp.models.vae import OFFICIAL_VAE_FILENAME, WanVAE, decodes_without_diffusers, load_vae
from lightx2v_sp.models.vae_decoder import WanVAEDecoder
from lightx2v_sp.models.vae_rows import decode_band, unsupported_reason

SMALL = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def _random_vae(**overrides) -> AutoencoderKLWan:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():  # norms' gammas away from 1, biases away from 0
            if name.endswith("gamma") or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    vae = _random_vae()
    vae.save_pretrained(path / "vae", safe_serialization=True)
    torch.save(vae_mod.diffusers_to_official_state(vae), path / OFFICIAL_VAE_FILENAME)
    return path


def _z(frames=3, h=6, w=8):
    return torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(1))


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["diffusers", "official"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_decode_equals_diffusers(saved, dtype, layout, device):
    where = saved / "vae" if layout == "diffusers" else saved / OFFICIAL_VAE_FILENAME
    ours = load_vae(where, dtype, decode_only=True).to(device)
    ref = load_vae(where, dtype).to(device)
    assert isinstance(ours, WanVAEDecoder) and isinstance(ref, AutoencoderKLWan)
    assert decodes_without_diffusers(where)
    assert {k: v.dtype for k, v in ours.state_dict().items()} == \
        {k: v.dtype for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    z = _z().to(device=device, dtype=dtype)
    with torch.no_grad():
        out = ours.decode(z, return_dict=False)[0]
        expected = ref.decode(z, return_dict=False)[0]
    assert out.shape == expected.shape == (1, 3, 9, 48, 64) and out.dtype == expected.dtype
    assert torch.equal(out, expected)


def test_wan_vae_wrapper_streams_and_decodes_the_same(saved):
    ours, ref = (WanVAE.from_pretrained(saved / "vae", decode_only=d) for d in (True, False))
    assert (ours.z_dim, ours.temporal_stride, ours.spatial_stride) == (ref.z_dim, ref.temporal_stride, ref.spatial_stride)
    assert torch.equal(ours.mean, ref.mean) and torch.equal(ours.std, ref.std)
    z = _z(frames=2)
    got = []
    with ours.frames_to(got.append) as streams:
        video = ours.decode(z)
    assert streams and torch.equal(video, ref.decode(z))
    assert sum(f.shape[0] for f in got) == 5  # 1 + 4 frames, in order, as the decoder made them
    with pytest.raises(RuntimeError, match="decode only"):
        ours.encode(torch.zeros(1, 3, 1, 48, 64))


def test_row_bands_equal_diffusers(saved):
    ours = load_vae(saved / "vae", decode_only=True)
    ref = load_vae(saved / "vae")
    assert unsupported_reason(ours) is None
    z = _z(frames=2, h=10, w=6)
    for a, b in [(0, 3), (3, 7), (7, 10)]:
        assert torch.equal(decode_band(ours, z, a, b), decode_band(ref, z, a, b))


def test_other_layouts_load_as_diffusers(tmp_path):
    residual = _random_vae(is_residual=True, patch_size=2, dim_mult=[1, 2, 2], temperal_downsample=[False, True],
                           z_dim=16, base_dim=16)
    residual.save_pretrained(tmp_path / "v22", safe_serialization=True)
    assert not decodes_without_diffusers(tmp_path / "v22")
    assert isinstance(load_vae(tmp_path / "v22", decode_only=True), AutoencoderKLWan)


def test_a_decoder_key_missing_is_an_error_naming_the_file(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "vae").mkdir()
    state = load_file(saved / "vae" / "diffusion_pytorch_model.safetensors")
    del state["decoder.conv_out.weight"]
    save_file(state, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "vae" / "config.json").write_text((saved / "vae" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight"):
        load_vae(tmp_path / "vae", decode_only=True)
    assert os.path.isfile(tmp_path / "vae" / "config.json")


@pytest.mark.parametrize("shape,dtype,config", [
    ((1, 16, 1, 5, 7), torch.float32, {}),                         # one latent frame (one output frame), odd sizes
    ((2, 16, 2, 4, 4), torch.float16, {}),                         # a batch of two, fp16
    ((1, 16, 3, 4, 6), torch.float32, dict(decoder_base_dim=16, num_res_blocks=2,
                                           temperal_downsample=[True, True, False])),
])
def test_decode_equals_diffusers_on_other_shapes_and_configs(tmp_path, shape, dtype, config):
    _random_vae(**config).save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours = load_vae(tmp_path / "vae", dtype, decode_only=True)
    ref = load_vae(tmp_path / "vae", dtype)
    assert isinstance(ours, WanVAEDecoder)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours.decode(z)[0], ref.decode(z, return_dict=False)[0])
