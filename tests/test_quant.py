"""FP8 weights, the units: the format and its error bound, the two matmul paths, swapping layers in,
LoRA merging into fp8 layers, block offload moving fp8 bytes, the memory plan's factor, UMT5 in fp8.

Bounds, from e4m3's 3 mantissa bits: a value rounds to within half a step, 2^-4 of its magnitude, so
a dequantized weight is within |w| / 16 of the original (values under e4m3's normal range, below
amax / 448 / 64 of their row, are spaced amax / 448 / 512 apart: within amax / 2^18 absolutely).
"""
import pytest
import torch
import torch.nn.functional as F

from lightx2v_sp.models.quant import (DIT_LINEARS, T5_LINEARS, Fp8Linear, dequantize, fp8_layers, fp8_linear,
                                      quantize_linears, quantize_rows, set_matmul)
from lightx2v_sp.models.wan import WanConfig, WanModel
from lightx2v_sp.models.wan.lora import LoraEntry, merge_lora
from lightx2v_sp.offload import offload_dit_blocks
from lightx2v_sp.offload.transport import HostTransport
from lightx2v_sp.pipeline.finite import check_weights


def _rows_of_many_magnitudes(rows=48, cols=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 10 ** (-6 * torch.rand(rows, 1, generator=gen))


def test_per_row_quantization_error_bound_and_zero_rows():
    w = _rows_of_many_magnitudes()
    w[3] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48, 1) and scale[3] == 1
    back = dequantize(q, scale, torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True)
    assert ((back - w).abs() <= w.abs() / 16 + amax / 2 ** 18).all()
    assert (back[3] == 0).all()
    # one scale for the tensor instead: rows 6 decades below the largest flush into subnormals
    per_tensor = (w / (w.abs().max() / 448)).to(torch.float8_e4m3fn).float() * (w.abs().max() / 448)
    assert ((per_tensor - w).abs() > w.abs() / 2).any()


def test_weight_only_is_exactly_the_dequantized_linear():
    lin = torch.nn.Linear(64, 48)
    lin.weight.data = _rows_of_many_magnitudes()
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    assert q.matmul == "weight_only"
    assert torch.equal(q(x), F.linear(x, dequantize(q.weight, q.weight_scale, torch.float32), lin.bias))


def test_fp8_gemm_path_on_cpu_matches_weight_only_within_activation_rounding():
    """torch._scaled_mm with row-wise scales also runs on the CPU: the GEMM path's code is tested here,
    its speed on the GPU (scripts/bench_fp8.py). Activations rounded to e4m3 per token add at most
    2^-4 relative per input value: the output error stays below |x| |w| / 16 per row (Cauchy-Schwarz)."""
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(7, 64, generator=gen) * torch.logspace(-3, 1, 7)[:, None]  # tokens of many magnitudes
    exact = q(x)
    q.matmul = "fp8"
    out = q(x)
    w = q.dequantized()
    bound = x.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :] / 16
    assert ((out - exact).abs() <= bound).all()
    assert ((out - exact).abs() > 0).any()  # the activations really went through e4m3
    assert fp8_linear(torch.empty(0, 64), q.weight, q.weight_scale, q.bias).shape == (0, 48)  # a rank without tokens


def test_quantize_linears_picks_the_block_linears_and_matmul_follows_the_device():
    cfg = WanConfig.tiny()
    model = WanModel(cfg).eval()
    names = quantize_linears(model, DIT_LINEARS)
    assert len(names) == 7 * cfg.num_layers  # qkv, o, q, kv, o, ffn.0, ffn.2 per block
    assert not isinstance(model.head.head, Fp8Linear) and not isinstance(model.text_embedding[0], Fp8Linear)
    assert set_matmul(model, torch.device("cpu"), torch.bfloat16) == {"weight_only": len(names)}
    with torch.no_grad():
        out = model(torch.randn(1, cfg.in_dim, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, cfg.text_dim))
    assert torch.isfinite(out).all()


def test_check_weights_finds_nan_bytes_in_fp8_weights():
    model = torch.nn.Sequential(Fp8Linear.from_linear(torch.nn.Linear(16, 16)))
    check_weights(model, "DiT", "x.safetensors")
    model[0].weight.data.view(torch.uint8)[2, 3] = 0x7F  # e4m3fn's NaN
    with pytest.raises(ValueError, match=r"x.safetensors hold NaN or inf values \(in 0.weight"):
        check_weights(model, "DiT", "x.safetensors")


def test_lora_merges_into_the_dequantized_weight_and_quantizes_again():
    cfg = WanConfig.tiny()
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    quantize_linears(model, DIT_LINEARS)
    layer = model.blocks[0].self_attn.qkv
    before = layer.dequantized()
    down, up = torch.randn(4, cfg.dim), torch.randn(cfg.dim, 4) * 0.01
    merge_lora(model, [LoraEntry({"blocks.0.self_attn.k.lora_down.weight": down,
                                  "blocks.0.self_attn.k.lora_up.weight": up}, scale=2.0)])
    want = before.clone()
    want[cfg.dim:2 * cfg.dim] += 2.0 * up @ down  # k is the second third of the fused qkv rows
    q, scale = quantize_rows(want)
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.dequantized()[:cfg.dim], before[:cfg.dim])  # untouched rows keep their values


def test_block_offload_streams_fp8_bytes_and_gives_the_resident_result():
    cfg = WanConfig.tiny()
    torch.manual_seed(0)
    ref = WanModel(cfg).eval()
    quantize_linears(ref, DIT_LINEARS)
    model = WanModel(cfg).eval()
    quantize_linears(model, DIT_LINEARS)
    model.load_state_dict(ref.state_dict())
    full = sum(p.numel() * 4 for p in WanModel(cfg).blocks[0].parameters())
    inputs = (torch.randn(1, cfg.in_dim, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, cfg.text_dim))
    handle = offload_dit_blocks(model, "cpu", transport=HostTransport())
    with torch.no_grad():
        assert torch.equal(model(*inputs), ref(*inputs))
    linear = sum(m.weight.numel() for _, m in fp8_layers(ref.blocks[0]))
    # one byte per quantized weight instead of four (fp32 here), plus the scales and layout padding
    assert handle.block_nbytes < full - 2.9 * linear
    assert handle.stats()["block_copies"] > 0


def test_plan_counts_fp8_weight_bytes(real_configs):  # the configs' repo ids from the fixture hub cache
    from lightx2v_sp.config import load_config
    from lightx2v_sp.plan import make_plan

    base = ["offload.dit=none", "parallel.ulysses_degree=4", "parallel.cfg_degree=2", "model.quant=null"]
    bf16 = make_plan(load_config("configs/wan_t2v_14b_720p_4090x8.yaml", base), 8)[1][0]
    fp8 = make_plan(load_config("configs/wan_t2v_14b_720p_4090x8.yaml", base + ["model.quant=fp8",
                                                                                   "text_encoder.quant=fp8"]), 8)[1][0]
    dit = {s.stage: s for s in bf16.stages}["denoise"].gpu["DiT"]
    dit8 = {s.stage: s for s in fp8.stages}["denoise"].gpu["DiT"]
    assert 0.49 < dit8 / dit < 0.53  # blocks at ~1 byte per weight; embeddings and head stay bf16
    te = {s.stage: s for s in bf16.stages}["text"].gpu["text encoder"]
    te8 = {s.stage: s for s in fp8.stages}["text"].gpu["text encoder"]
    assert 0.55 < te8 / te < 0.62  # the vocabulary embedding (a fifth of UMT5) stays bf16
    assert fp8.gpu_peak < 0.92 * 24 * 2 ** 30 < bf16.gpu_peak  # fits a 4090 without offload


@pytest.mark.parametrize("mode", ["replicate", "load_shard", "shard_after_load"])
def test_t5_fp8_weight_only_close_to_full_precision(mode):
    """UMT5 in fp8 (weight-only) against fp32, and a quantized full encoder cut to a tp shard (its
    scales go with their rows): the tiny encoder's output moves by ~1% (e4m3 weights); 5% bounds it."""
    from lightx2v_sp.models.t5 import T5Encoder, T5Shard
    from lightx2v_sp.models.t5.parallelize import shard_encoder
    from lightx2v_sp.models.tiny import ensure_tiny_model

    path = f"{ensure_tiny_model()}/text_encoder"
    ids = torch.randint(2, 200, (2, 9))
    ref = T5Encoder.from_pretrained(path, dtype=torch.float32).forward_local(ids)
    enc = T5Encoder.from_pretrained(path, dtype=torch.float32, quant="fp8")
    assert len(fp8_layers(enc)) == 7 * enc.config.num_layers
    assert T5_LINEARS.fullmatch("blocks.0.ffn.gate")
    if mode == "load_shard":  # a tp rank quantizes only the slices it reads
        shard = T5Encoder.from_pretrained(path, dtype=torch.float32, quant="fp8", shard=T5Shard(1, 2))
        rows = enc.blocks[0].attn.q.out_features // 2
        assert torch.equal(shard.blocks[0].attn.q.dequantized(), enc.blocks[0].attn.q.dequantized()[rows:])
        assert len(fp8_layers(shard)) == len(fp8_layers(enc))
        out = enc.forward_local(ids)
    elif mode == "shard_after_load":
        full = enc.forward_local(ids)
        halves = [shard_encoder(T5Encoder.from_pretrained(path, dtype=torch.float32, quant="fp8"), T5Shard(r, 2))
                  for r in range(2)]
        # the row-sliced scales are the full encoder's: the shards hold exactly its dequantized pieces
        q_full = enc.blocks[0].attn.q.dequantized()
        assert torch.equal(torch.cat([h.blocks[0].attn.q.dequantized() for h in halves]), q_full)
        assert torch.equal(torch.cat([h.blocks[0].ffn.fc2.dequantized() for h in halves], dim=1),
                           enc.blocks[0].ffn.fc2.dequantized())
        out = full
    else:
        out = enc.forward_local(ids)
    err = float((out - ref).norm() / ref.norm())
    assert 1e-4 < err < 0.05, err


def test_a_quantized_block_traces_under_torch_compile():
    """model.compile compiles each block: dynamo and AOT autograd must trace both matmul paths (the
    aot_eager backend skips inductor's code generation, which the GPU test covers)."""
    import torch._dynamo

    cfg = WanConfig.tiny()
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    quantize_linears(model, DIT_LINEARS)
    inputs = (torch.randn(1, cfg.in_dim, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, cfg.text_dim))
    for path in ("weight_only", "fp8"):
        for _, layer in fp8_layers(model):
            layer.matmul = path
        with torch.no_grad():
            eager = model(*inputs)
            for block in model.blocks:
                block.compile(backend="aot_eager", dynamic=False)
            compiled = model(*inputs)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        for block in model.blocks:
            block._compiled_call_impl = None  # back to eager for the next path
        torch._dynamo.reset()
