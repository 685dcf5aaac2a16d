"""Exact row-band VAE decode (models/vae_rows.py) and its split over gloo ranks (pipeline/decode.py):
equal to the whole-frame single-process decode of the same tiny Wan2.1 VAE."""
import functools
from types import SimpleNamespace

import pytest
import torch

from lightx2v_sp.models.tiny import TINY_VAE
from lightx2v_sp.testing import run_on_ranks

# fp32: a band runs the same ops as the full frame on a cropped input, so only the summation order
# inside the convolutions may differ (other tensor sizes -> other kernels). Decoder outputs are O(1)
# and reassociation noise measures ~4e-6 here; dropping one halo row anywhere gives >= 1e-5 at
# the first stage and >= 7e-5 elsewhere, so 8e-6 separates "exact" from "halo too small".
FP32_ATOL = 8e-6
# bf16: CPU kernels accumulate each output the same way whatever the input's size, so bands and the
# whole frame measure bit-equal here; 2 ulps of bf16 near 1 (2^-6) leave room for other kernels. The
# halo's exactness is what the fp32 cases check; this one checks the bf16 path end to end.
BF16_ATOL = 2 ** -6
LATENT = (1, 16, 2, 40, 4)  # 2 latent frames -> 5 frames; 40 rows: bands of 14/13/13 on 3 ranks
SMALL = (1, 16, 2, 16, 4)


def _tiny_vae(dtype=torch.float32):
    from diffusers import AutoencoderKLWan

    from lightx2v_sp.models.vae import WanVAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        vae = AutoencoderKLWan(**TINY_VAE).eval().requires_grad_(False)
        # scale the random weights up a little: the default init decodes to near-constant frames
        for p in vae.decoder.parameters():
            p.mul_(1.5)
    return WanVAE(vae.to(dtype))


def _latents(shape=LATENT):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


def test_halo_rows_of_wan21_and_tiny_vae():
    from diffusers import AutoencoderKLWan

    from lightx2v_sp.models.vae_rows import decoder_stages, halo_latent_rows

    with torch.device("meta"):
        real = AutoencoderKLWan()  # Wan2.1's VAE config (diffusers' defaults)
    # by hand: 3 res blocks x 2 convs per level, one 3x3 conv after each 2x upsample, conv_out:
    # 1 + 6 = 7 px at 8x -> ceil(8/2) + 6 = 10 at 4x -> ceil(11/2) + 6 = 12 at 2x -> ceil(13/2) + 6 = 13
    assert halo_latent_rows(real) == 13
    stages, factor = decoder_stages(real.decoder)
    assert factor == 8 and stages[-1].halo == 1 and [s.halo for s in stages if s.factor == 8][0] == 7
    assert halo_latent_rows(_tiny_vae().vae) == 9  # 2 res blocks per level: 5 -> 7 -> 8 -> 9


def test_row_bands_cover_rows_in_order():
    from lightx2v_sp.pipeline.decode import row_bands

    assert row_bands(40, 3) == [[(0, 14)], [(14, 27)], [(27, 40)]]
    assert row_bands(13, 2, tiling=3) == [[(0, 3), (3, 5), (5, 7)], [(7, 9), (9, 11), (11, 13)]]
    assert row_bands(2, 3) == [[(0, 1)], [(1, 2)], []]  # more ranks than rows: the last one idles


@pytest.mark.parametrize("band", [(0, 14), (14, 27), (27, 40), (19, 20)])
def test_band_equals_full_decode(band):
    from lightx2v_sp.models.vae_rows import decode_band

    vae = _tiny_vae().vae
    z = _latents()
    full = vae.decode(z, return_dict=False)[0]
    assert full.std() > 0.05  # a real picture, not a constant that would match anything
    a, b = band
    piece = decode_band(vae, z, a, b)
    assert piece.shape == (1, 3, 5, 8 * (b - a), 32)
    torch.testing.assert_close(piece, full[..., 8 * a:8 * b, :], atol=FP32_ATOL, rtol=0)


def test_band_outside_the_latent_is_an_error():
    from lightx2v_sp.models.vae_rows import decode_band

    with pytest.raises(ValueError, match=r"\[30, 50\) is not inside the 40 latent rows"):
        decode_band(_tiny_vae().vae, _latents(), 30, 50)


def _decode_on_ranks(rank, world, cases):
    from lightx2v_sp.pipeline.decode import decode_rows, gather_video, vae_on_every_rank

    out = {}
    for name, (shape, dtype, parallel, tiling) in cases.items():
        cfg = SimpleNamespace(dtype=dtype, parallel=parallel, tiling=tiling)
        vae = _tiny_vae(getattr(torch, dtype)) if rank == 0 or vae_on_every_rank(cfg, world) else None
        piece, rows = decode_rows(vae, _latents(shape), torch.device("cpu"), cfg, "gpu", world, rank)
        out[name] = (gather_video(piece, rows, world, rank), None if piece is None else piece.shape[-2])
    return out


CASES = {
    "fp32": (LATENT, "float32", "split", 1),
    "fp32_tiled": (LATENT, "float32", "split", 3),   # 2 ranks x 3 bands of 7/7/7/7/6/6 rows
    "bf16": (SMALL, "bfloat16", "split", 1),
    "rank0": (SMALL, "float32", "rank0", 1),
    "tiny_height": ((1, 16, 2, 2, 5), "float32", "split", 1),  # 2 rows on 3 ranks: one idles
}


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request):
    world = request.param
    cases = {k: v for k, v in CASES.items() if world == 3 or k != "tiny_height"}
    if world == 3:
        cases = {k: v for k, v in cases.items() if k in ("fp32", "tiny_height")}
    return world, cases, run_on_ranks(_decode_on_ranks, world, cases, timeout=240)


@functools.lru_cache(maxsize=None)
def _reference(shape, dtype):
    return _tiny_vae(getattr(torch, dtype)).decode(_latents(shape))[0]


def test_split_decode_equals_single_process(ranks):
    world, cases, results = ranks
    for name, (shape, dtype, parallel, tiling) in cases.items():
        ref = _reference(shape, dtype)
        video, own_rows = results[0][name]
        assert video.shape == ref.shape and video.dtype == torch.float32, name
        assert all(results[r][name][0] is None for r in range(1, world)), name  # the video is rank 0's
        atol = BF16_ATOL if dtype == "bfloat16" else FP32_ATOL
        torch.testing.assert_close(video, ref, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
        if parallel == "split" and shape == LATENT:  # every rank decoded its own rows, no more
            expected = {(3, 1): [112, 104, 104], (2, 1): [160, 160], (2, 3): [8 * 21, 8 * 19]}[world, tiling]
            assert [results[r][name][1] for r in range(world)] == expected, name
    if "rank0" in cases:
        assert results[0]["rank0"][1] == 128 and results[1]["rank0"][1] is None  # rank 0 decodes alone
    if "tiny_height" in cases:
        assert [results[r]["tiny_height"][1] for r in range(world)] == [8, 8, None]
