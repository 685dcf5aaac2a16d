"""GPU-only checks of the FP8 GEMM path (skipped without CUDA; the FP8 GEMM ones without sm89+).

Bound for the GEMM against the weight-only path (same e4m3 weights): the activations are rounded to
e4m3 per token (2^-4 relative per value at most), so |out - exact| <= |x_row| |w_row| / 16 by
Cauchy-Schwarz, plus the bf16 rounding of both outputs (2^-8 relative each).
"""
import json
import os

import pytest
import torch

from lightx2v_sp.models.quant import Fp8Linear, fp8_gemm_supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or
                               not fp8_gemm_supported(torch.device("cuda"), torch.bfloat16),
                               reason="needs an sm89+ GPU (FP8 tensor cores)")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")


def _layer(k=1536, n=4608, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    lin.weight.data = torch.randn(n, k, device="cuda", generator=g).bfloat16() * 0.02
    return Fp8Linear.from_linear(lin), torch.randn(1000, k, device="cuda", generator=g).bfloat16()


def _bound(q, x, exact):
    w = q.dequantized()
    return x.float().norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :] / 16 + exact.float().abs() / 64


@needs_fp8
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_gemm_matches_weight_only_within_activation_rounding(compiled):
    q, x = _layer()
    with torch.no_grad():
        exact = q(x)
        q.matmul = "fp8"
        fn = torch.compile(q, dynamic=False) if compiled else q
        out = fn(x)
        assert ((out.float() - exact.float()).abs() <= _bound(q, x, exact)).all()
        rel = float((out.float() - exact.float()).norm() / exact.float().norm())
        assert 1e-4 < rel < 0.05, rel  # went through e4m3 activations, and not far


@needs_fp8
def test_fast_accumulation_stays_within_the_activation_rounding_bound():
    """model.fp8_accum=fast: the same e4m3 operands, a lower-precision accumulator. At K = 5120 its error
    is far below what the e4m3 activations cost, so the same bound holds. On Hopper the two accumulators
    differ (equal would mean the flag was dropped); the compiled layer reads the flag too."""
    q, x = _layer(k=5120, n=1024)
    with torch.no_grad():
        exact = q(x)
        q.matmul = "fp8"
        fp32_accum = q(x)
        q.fast_accum = True
        fast = q(x)
        compiled = torch.compile(q, dynamic=False)(x)
    assert ((fast.float() - exact.float()).abs() <= _bound(q, x, exact)).all()
    assert float((fast.float() - fp32_accum.float()).norm() / fp32_accum.float().norm()) < 1e-2
    assert ((compiled.float() - exact.float()).abs() <= _bound(q, x, exact)).all()
    if torch.cuda.get_device_capability() == (9, 0):
        # compiled, the quantizer gives eager's bytes but for about one value in 10^7 (one H100), so the
        # compiled output matches the fast one almost everywhere and the fp32-accumulated one far less
        differs = float((fast != fp32_accum).float().mean())
        assert differs > 0
        assert float((compiled != fast).float().mean()) < differs / 10


@needs_fp8
def test_tiny_run_on_gpu_uses_the_fp8_gemm_and_says_so(tmp_path):
    from lightx2v_sp.config import load_config
    from lightx2v_sp.pipeline import run

    cfg = load_config(CONFIG, [f"output.path={tmp_path}/g.mp4", "device=cuda", "model.dtype=bf16", "model.quant=fp8",
                               "text_encoder.quant=fp8", "model.compile=true"])
    ref = load_config(CONFIG, [f"output.path={tmp_path}/r.mp4", "device=cuda", "model.dtype=bf16"])
    ours = run(cfg, torch.device("cuda"), progress=False).latents
    base = run(ref, torch.device("cuda"), progress=False).latents
    summary = json.loads((tmp_path / "g.json").read_text())["quant"]["dit"][0]
    assert list(summary["matmul"]) == ["fp8 GEMM (torch._scaled_mm, per-token activation scales)"]
    assert summary["fp8_accum"] == {"fast": 0, "exact": summary["layers"]}
    assert float((ours - base).norm() / base.norm()) < 0.15  # test_quant_checkpoints' bound for e4m3 weights
    fast = load_config(CONFIG, [f"output.path={tmp_path}/f.mp4", "device=cuda", "model.dtype=bf16",
                                "model.quant=fp8", "model.fp8_accum=fast"])
    run(fast, torch.device("cuda"), progress=False)
    summary = json.loads((tmp_path / "f.json").read_text())["quant"]["dit"][0]
    assert summary["fp8_accum"] == {"fast": summary["layers"], "exact": 0}


def test_weight_only_on_gpu_is_the_dequantized_linear():
    q, x = _layer(k=96, n=80)
    with torch.no_grad():
        assert torch.equal(q(x), torch.nn.functional.linear(x, q.dequantized(torch.bfloat16), q.bias))
