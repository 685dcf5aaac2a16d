"""GPU-only checks of the fused FP8 kernels, the local attention backends, their log-sum-exp forms and
the ring's Triton merge (skipped without CUDA)."""
import pytest
import torch
import torch.nn.functional as F

from lightx2v_sp.attention import attention, available_backends, ulysses_attention
from lightx2v_sp.attention import backends
from lightx2v_sp.attention.backends import kernel_info
from lightx2v_sp.attention.lse import math_lse
from lightx2v_sp.attention.ring_merge import merge_partials
from lightx2v_sp.distributed.comm_quant import dequantize_into, packed_row_bytes, quantize_into

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_triton_codec_matches_torch_bytes(dtype, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 2, 3 * 5, d, device="cuda", generator=g).to(dtype)
    x[0, 0, 0] = 0
    x[1, 0, 1, 3] = float("nan")
    x[2, 1, 2, 7] = float("inf")
    x[3] *= 1e4
    piece = x.view(37, 2, 3, 5, d)[:, :, 1].transpose(0, 1)  # strided like a Ulysses head group
    # a view whose start is only 4-byte aligned, as per-destination chunks of a wire buffer are
    wire_t = torch.full((2, 38, 5, packed_row_bytes(d)), 7, dtype=torch.uint8, device="cuda")
    wire_k = wire_t.clone()
    out_t, out_k = wire_t[:, 1:], wire_k[:, 1:]
    quantize_into(piece, out_t, impl="torch")
    quantize_into(piece, out_k, impl="triton")
    assert (wire_k[:, 0] == 7).all(), "nothing written outside the view"
    same = (out_t == out_k).all(-1)
    # identical bytes, except payload bytes of NaN rows, where NaN encodings may differ
    nan_rows = piece.float().isnan().any(-1) | piece.float().isinf().any(-1)
    assert same[~nan_rows].all()
    dec_t = torch.empty(2, 37, 5, d, dtype=dtype, device="cuda")
    dec_k = torch.full_like(dec_t, 123.0)
    dequantize_into(out_t, dec_t, impl="torch")
    dequantize_into(out_t, dec_k, impl="triton")
    assert torch.equal(dec_t[~nan_rows], dec_k[~nan_rows])
    assert dec_k[nan_rows].isnan().all()


def test_backends_agree_with_sdpa_math():
    q, k, v = (torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for name in ["auto"] + available_backends():
        out = attention(q, k, v, backend=name)
        rel = (out.float() - ref).norm() / ref.norm()
        # exact kernels on bf16 operands: 1e-3 .. 1e-2 relative; quantized (sage): int8 q/k, a few %
        bound = 1e-2 if name == "auto" or kernel_info(name).exact else 5e-2
        assert rel < bound, (name, rel.item())


def test_single_rank_ulysses_is_the_local_kernel():
    q, k, v = (torch.randn(1, 256, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert torch.equal(ulysses_attention(q, k, v, group=None), attention(q, k, v))


def test_gpu_lse_kernels_match_math():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 300, 8, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    ref, ref_lse = math_lse(q.float(), k.float(), v.float())
    for name in backends.available_backends():
        info = backends.kernel_info(name)
        if info.lse is None or not info.supports(q.device, q.dtype, 128):
            continue
        out, lse = info.lse(q, k, v)
        # bf16 kernels: 1e-3..1e-2 relative on the output. The lse is fp32 from the same bf16 values, so
        # only accumulation order differs (~1e-5 on |lse| ~ 5); a log2-based or unscaled lse is O(1) off
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, name
        assert (lse - ref_lse).abs().max().item() < 1e-3, name


def test_gpu_triton_merge_matches_torch():
    g = torch.Generator(device="cuda").manual_seed(0)
    parts = [torch.randn(1, 333, 5, 128, device="cuda", generator=g).bfloat16() for _ in range(3)]
    lses = [torch.randn(1, 5, 333, device="cuda", generator=g) for _ in range(3)]
    fused = merge_partials(parts, lses, torch.bfloat16, impl="triton")
    ref = merge_partials(parts, lses, torch.bfloat16, impl="torch")
    assert (fused.float() - ref.float()).abs().max().item() <= 2 ** -7  # both fp32 inside; one bf16 rounding
