import torch

from lightx2v_sp.distributed.comm_quant import SCALE_BYTES, dequantize, packed_row_bytes, quantize, quantize_into


def test_round_trip_bound_across_magnitudes():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-30, 30, 13).view(13, 1, 1)
    x = torch.randn(13, 7, 128, generator=g) * scales
    y = dequantize(quantize(x), torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    # Documented bound: |x' - x| <= amax / 16 per value (3 mantissa bits).
    assert ((y - x).abs() <= amax / 16).all()
    # and it is a real quantizer, not a copy
    assert (y != x).any()


def test_packed_layout_is_payload_then_scale():
    x = torch.randn(3, 5, 64)
    packed = quantize(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 + SCALE_BYTES)
    scale = packed[..., 64:].contiguous().view(torch.float32)
    assert torch.allclose(scale, x.abs().amax(-1, keepdim=True) / 448)
    assert packed_row_bytes(128) / (2 * 128) < 0.52  # vs bf16 at D = 128


def test_special_values():
    x = torch.randn(7, 32)
    x[0] = 0
    x[5] = torch.randn(32) * 1e-37  # amax / 448 is subnormal: 1 / scale must not overflow
    x[5, ::2] = 0
    x[6] = torch.randn(32) * 1e-43  # below fp32's normal range
    x[1, 3] = float("nan")
    x[2, 4] = float("inf")
    x[3, 5] = -float("inf")
    x[4] = x[4] / x[4].abs().max() * 3e38  # near the fp32 maximum
    y = dequantize(quantize(x), torch.float32)
    assert (y[0] == 0).all(), "zero rows decode to exact zeros"
    assert y[1].isnan().all() and y[2].isnan().all() and y[3].isnan().all(), "non-finite rows decode to NaN"
    assert torch.isfinite(y[4]).all() and ((y[4] - x[4]).abs() <= x[4].abs().max() / 16).all()
    assert torch.isfinite(y[5]).all() and (y[5, ::2] == 0).all()
    assert ((y[5] - x[5]).abs() <= x[5].abs().max() / 16).all(), "the relative bound holds for tiny rows"
    assert torch.isfinite(y[6]).all() and ((y[6] - x[6]).abs() <= 2e-41).all(), "documented absolute floor"


def test_bf16_and_fp16_inputs_and_views():
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(4, 6, 128).to(dtype)
        buf = torch.zeros(2, 4, 6, packed_row_bytes(128), dtype=torch.uint8)
        quantize_into(x, buf[1])  # writing into a view of a wire buffer
        assert (buf[0] == 0).all()
        y = dequantize(buf[1], dtype)
        assert y.dtype == dtype
        assert ((y.float() - x.float()).abs() <= x.float().abs().amax(-1, keepdim=True) / 16 + 1e-2).all()
