"""LoRA files: every key layout merges to the same weights, fused slices, differences, errors, config forms.

Weights are compared with torch.equal where both sides do the same fp32 arithmetic, and with a
2e-6 tolerance where only the grouping differs (a scale folded into one factor vs applied to
the product: a few fp32 ulps of values below 1).
"""
import os

import pytest
import torch
from safetensors.torch import save_file

from lightx2v_sp.config import load_config
from lightx2v_sp.models import tiny
from lightx2v_sp.models.wan import WanConfig, WanModel
from lightx2v_sp.models.wan.lora import LoraEntry, merge_lora, select_loras
from lightx2v_sp.pipeline import run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
DIM = 96


def model():
    torch.manual_seed(0)
    return WanModel(WanConfig.tiny(dim=DIM, num_heads=6)).eval()


def pair(seed, rows=DIM, cols=DIM, rank=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g)


def merged(sd, scale=1.0, metadata=None):
    m = model()
    merge_lora(m, [LoraEntry(sd, scale, metadata=metadata)])
    return dict(m.state_dict())


def test_all_key_layouts_merge_identically():
    down, up = pair(1)
    fdown, fup = pair(2, rows=256)
    alpha = torch.tensor(8.0)
    layouts = {
        "diffusers": ({"transformer.blocks.1.attn1.to_k.lora_A.weight": down,
                       "transformer.blocks.1.attn1.to_k.lora_B.weight": up,
                       "transformer.blocks.0.ffn.net.0.proj.lora_A.weight": fdown,
                       "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": fup}, {"transformer.lora_alpha": 8,
                                                                                   "transformer.r": 4}),
        "comfy": ({"diffusion_model.blocks.1.self_attn.k.lora_down.weight": down,
                   "diffusion_model.blocks.1.self_attn.k.lora_up.weight": up,
                   "diffusion_model.blocks.1.self_attn.k.alpha": alpha,
                   "diffusion_model.blocks.0.ffn.0.lora_A.weight": fdown,
                   "diffusion_model.blocks.0.ffn.0.lora_B.weight": fup,
                   "diffusion_model.blocks.0.ffn.0.alpha": alpha}, None),
        "musubi": ({"lora_unet_blocks_1_self_attn_k.lora_down.weight": down,
                    "lora_unet_blocks_1_self_attn_k.lora_up.weight": up, "lora_unet_blocks_1_self_attn_k.alpha": alpha,
                    "lora_unet_blocks_0_ffn_0.lora_down.weight": fdown,
                    "lora_unet_blocks_0_ffn_0.lora_up.weight": fup, "lora_unet_blocks_0_ffn_0.alpha": alpha}, None),
    }
    results = {name: merged(sd, 0.5, meta) for name, (sd, meta) in layouts.items()}
    base = dict(model().state_dict())
    for name in ("comfy", "musubi"):
        for k in base:
            assert torch.equal(results[name][k], results["diffusers"][k]), (name, k)
    # the k update lands in rows [DIM, 2*DIM) of the fused qkv weight, nowhere else; 0.5 * 8/4 = 1
    qkv, before = results["diffusers"]["blocks.1.self_attn.qkv.weight"], base["blocks.1.self_attn.qkv.weight"]
    torch.testing.assert_close(qkv[DIM:2 * DIM] - before[DIM:2 * DIM], up @ down, atol=2e-6, rtol=0)
    assert torch.equal(qkv[:DIM], before[:DIM]) and torch.equal(qkv[2 * DIM:], before[2 * DIM:])
    changed = [k for k in base if not torch.equal(base[k], results["diffusers"][k])]
    assert changed == ["blocks.0.ffn.0.weight", "blocks.1.self_attn.qkv.weight"]


def test_cross_attention_kv_slices_differences_and_biases():
    down, up = pair(3)
    g = torch.Generator().manual_seed(4)
    diff, diff_b, mod = torch.randn(DIM, DIM, generator=g), torch.randn(DIM, generator=g), torch.randn(1, 6, DIM)
    sd = {"blocks.0.cross_attn.v.lora_A.weight": down, "blocks.0.cross_attn.v.lora_B.weight": up,
          "blocks.0.cross_attn.v.lora_B.bias": diff_b, "blocks.0.cross_attn.k.diff": diff,
          "blocks.0.cross_attn.k.diff_b": diff_b, "blocks.0.modulation.diff": mod,
          "blocks.0.self_attn.norm_q.diff": diff_b}
    base, out = dict(model().state_dict()), merged(sd, scale=2.0)
    kv, kv_b = out["blocks.0.cross_attn.kv.weight"], out["blocks.0.cross_attn.kv.bias"]
    torch.testing.assert_close(kv[:DIM], base["blocks.0.cross_attn.kv.weight"][:DIM] + 2 * diff, atol=2e-6, rtol=0)
    torch.testing.assert_close(kv[DIM:], base["blocks.0.cross_attn.kv.weight"][DIM:] + 2 * up @ down, atol=2e-5,
                               rtol=0)
    torch.testing.assert_close(kv_b, base["blocks.0.cross_attn.kv.bias"] + 2 * diff_b.repeat(2), atol=2e-6, rtol=0)
    torch.testing.assert_close(out["blocks.0.modulation"], base["blocks.0.modulation"] + 2 * mod, atol=2e-6, rtol=0)
    torch.testing.assert_close(out["blocks.0.self_attn.norm_q.weight"],
                               base["blocks.0.self_attn.norm_q.weight"] + 2 * diff_b, atol=2e-6, rtol=0)


def test_lightx2v_modulation_differences():
    """LightX2V's distill LoRAs carry `<module>.diff_m`, a difference for `<module>.modulation` (its loader:
    lightx2v/utils/lora_loader.py; Kijai's WanVideoWrapper renames it `<module>.modulation.diff`)."""
    g = torch.Generator().manual_seed(8)
    block, head = torch.randn(1, 6, DIM, generator=g), torch.randn(1, 2, DIM, generator=g)
    base = dict(model().state_dict())
    out = merged({"diffusion_model.blocks.1.diff_m": block, "diffusion_model.head.diff_m": head}, scale=0.5)
    torch.testing.assert_close(out["blocks.1.modulation"], base["blocks.1.modulation"] + 0.5 * block, atol=2e-6, rtol=0)
    torch.testing.assert_close(out["head.modulation"], base["head.modulation"] + 0.5 * head, atol=2e-6, rtol=0)
    assert [k for k in base if not torch.equal(base[k], out[k])] == ["blocks.1.modulation", "head.modulation"]
    kijai = merged({"diffusion_model.blocks.1.modulation.diff": block, "diffusion_model.head.modulation.diff": head},
                   scale=0.5)
    assert all(torch.equal(out[k], kijai[k]) for k in base)


@pytest.mark.parametrize("sd, key", [
    # a difference stored transposed: [DIM, 256] for the [256, DIM] ffn.0 weight (same element count)
    ({"diffusion_model.blocks.0.ffn.0.diff": torch.ones(DIM, 256)}, "diffusion_model.blocks.0.ffn.0.diff"),
    # a pair whose product is the transpose: down [4, 256], up [DIM, 4] -> [DIM, 256]
    ({"blocks.0.ffn.0.lora_down.weight": torch.ones(4, 256), "blocks.0.ffn.0.lora_up.weight": torch.ones(DIM, 4)},
     "blocks.0.ffn.0.lora_down.weight + blocks.0.ffn.0.lora_up.weight"),
    # a modulation table flattened: [6, DIM] for [1, 6, DIM]
    ({"blocks.0.diff_m": torch.ones(6, DIM)}, "blocks.0.diff_m"),
])
def test_update_shapes_must_match_exactly(tmp_path, sd, key):
    """The same element count in another shape is no match: one error line naming the file and the key."""
    path = str(tmp_path / "lora.safetensors")
    save_file(sd, path)
    m, before = model(), dict(model().state_dict())
    with pytest.raises(ValueError) as err:
        merge_lora(m, [LoraEntry({"blocks.1.self_attn.o.diff_b": torch.ones(DIM)}), LoraEntry(path)])
    msg = str(err.value)
    assert msg.startswith(f"LoRA {path}: {key} updates ") and "\n" not in msg, msg
    assert ("its transpose" in msg) == ("ffn" in key)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # nothing merged, not even entry 1


def test_bf16_weights_are_merged_in_fp32_and_rounded_once():
    down, up = pair(5)
    m = model().set_dtype(torch.bfloat16)
    expected = (m.blocks[0].self_attn.o.weight.float() + up @ down * 1e-3).bfloat16()
    merge_lora(m, [LoraEntry({"blocks.0.self_attn.o.lora_A.weight": down, "blocks.0.self_attn.o.lora_B.weight": up},
                             1e-3)])
    assert m.blocks[0].self_attn.o.weight.dtype == torch.bfloat16
    assert torch.equal(m.blocks[0].self_attn.o.weight, expected)


@pytest.mark.parametrize("sd, match", [
    ({"transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(4, DIM),
      "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(DIM, 4),
      "text_encoder.encoder.block.0.lora_A.weight": torch.zeros(4, 8)},
     r"3 key\(s\) match no layer.*text_encoder.*blocks\.7\.attn1\.to_q\.lora_A\.weight"),
    ({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, DIM)}, r"1 key\(s\) match no layer.*self_attn\.q"),
    ({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 32), "blocks.0.self_attn.q.lora_B.weight":
      torch.zeros(DIM, 4)}, r"lora_A.weight \+ blocks.0.self_attn.q.lora_B.weight updates blocks.0.self_attn.q.weight "
                            r"with shape \(96, 32\), but the model's tensor is \(96, 96\) \(the adapter was trained for "
                            r"a different model size"),
    ({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, DIM), "blocks.0.self_attn.q.lora_B.weight":
      torch.zeros(DIM, 2)}, "their ranks differ"),
    ({"blocks.0.self_attn.q.dora_scale": torch.zeros(DIM)}, "DoRA"),
])
def test_bad_files_are_errors_that_name_the_keys(sd, match):
    with pytest.raises(ValueError, match=match):
        merged(sd)


def test_files_directories_and_experts(tmp_path):
    down, up = pair(6)
    sd = {"blocks.0.self_attn.o.lora_A.weight": down, "blocks.0.self_attn.o.lora_B.weight": up}
    (tmp_path / "d").mkdir()
    save_file(sd, tmp_path / "d" / "pytorch_lora_weights.safetensors")
    torch.save(sd, tmp_path / "l.pt")
    a, b = model(), model()
    merge_lora(a, [LoraEntry(str(tmp_path / "d"))])
    merge_lora(b, [LoraEntry(str(tmp_path / "l.pt"))])
    assert torch.equal(a.blocks[0].self_attn.o.weight, b.blocks[0].self_attn.o.weight)
    with pytest.raises(ValueError, match="LoRA file not found"):
        merge_lora(a, [LoraEntry(str(tmp_path / "nope.safetensors"))])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read LoRA file"):
        merge_lora(a, [LoraEntry(str(tmp_path / "bad.safetensors"))])
    entries = [LoraEntry("x"), LoraEntry("h", expert="high_noise"), LoraEntry("l", expert="low_noise")]
    assert [e.source for e in select_loras(entries, "low_noise")] == ["x", "l"]
    with pytest.raises(ValueError, match="this model has a single DiT"):
        select_loras(entries, None)


def test_config_forms():
    cfg = load_config(CONFIG, ["lora=[{path: a.safetensors, scale: 0.8}]", "lora.0.scale=0.5", "lora.1.path=b.pt"])
    assert [(e.path, e.scale, e.expert) for e in cfg.lora] == [("a.safetensors", 0.5, None), ("b.pt", 1.0, None)]
    assert [e.path for e in load_config(CONFIG, ["lora=[a.safetensors]"]).lora] == ["a.safetensors"]
    for bad, match in [(["lora=[{path: a, scal: 1}]"], "Did you mean: 'scale'"),
                       (["lora.1.path=a"], "next one is lora.0"),
                       (["lora=[{scale: 2}]"], "missing mandatory value: path"),
                       (["lora=[{path: a, expert: mid}]"], "lora.0.expert"),
                       (["sample.timesteps=[1000,500]"], "sample.steps=2"),
                       (["sample.steps=2", "sample.timesteps=[500,1000]"], "strictly decreasing")]:
        with pytest.raises(ValueError, match=match):
            load_config(CONFIG, bad)


def test_tiny_lora_in_a_distilled_run(tmp_path):
    """The README example: the embedded tiny model with its LoRA, 4 steps, no CFG."""
    overrides = ["sample.guidance_scale=1", "sample.scheduler=euler", "sample.timesteps=[1000,750,500,250]",
                 "parallel.ulysses_degree=1"]
    plain = run(load_config(CONFIG, overrides + [f"output.path={tmp_path}/a.mp4"]), torch.device("cpu"),
                progress=False)
    with_lora = run(load_config(CONFIG, overrides + ["lora=[{path: tiny, scale: 0.8}]",
                                                     f"output.path={tmp_path}/b.mp4"]), torch.device("cpu"),
                    progress=False)
    assert with_lora.summary["lora"][0]["tensors_updated"] == tiny.TINY_WAN["num_layers"] * 11
    assert with_lora.summary["denoise"]["dit_forwards"] == 4
    assert (with_lora.latents - plain.latents).abs().mean() > 1e-2  # the adapter changes the result
    with pytest.raises(ValueError, match="only fits the tiny model"):
        run(load_config(CONFIG, overrides + ["lora=[tiny]", f"model.path={tiny.ensure_tiny_model()}"]),
            torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="LoRA file not found"):  # found in preflight, before any loading
        run(load_config(CONFIG, overrides + [f"lora=[{tmp_path}/missing.safetensors]"]), torch.device("cpu"),
            progress=False)


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_explicit_timesteps_are_shifted_like_the_default_schedule(name):
    from lightx2v_sp.pipeline.scheduler import make_scheduler

    shift = 5.0
    sched = make_scheduler(name, 4, shift, timesteps=[1000, 750, 500, 250])
    s = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    expected = 1000 * shift * s / (1 + (shift - 1) * s)  # 1000, 937.5, 833.3, 625
    # UniPC keeps integer timesteps (truncated) and starts 1e-6 below sigma 1; Euler keeps floats
    torch.testing.assert_close(sched.timesteps.double(), expected, atol=1.0, rtol=0)
    assert float(sched.sigmas[-1]) == 0.0 and len(sched.timesteps) == 4


def test_one_file_for_both_experts():
    """Wan2.2 A14B: keys under an expert prefix go to that expert only; a one-DiT model refuses them."""
    down, up = pair(7)
    sd = {"high_noise_model.blocks.0.self_attn.o.lora_A.weight": down,
          "high_noise_model.blocks.0.self_attn.o.lora_B.weight": up,
          "low_noise_model.blocks.1.self_attn.o.lora_A.weight": down,
          "low_noise_model.blocks.1.self_attn.o.lora_B.weight": up}
    high, low, base = model(), model(), dict(model().state_dict())
    assert merge_lora(high, [LoraEntry(sd)], expert="high_noise")[0]["tensors_updated"] == 1
    assert merge_lora(low, [LoraEntry(sd)], expert="low_noise")[0]["tensors_updated"] == 1
    changed = {name: [k for k, v in m.state_dict().items() if not torch.equal(v, base[k])]
               for name, m in (("high", high), ("low", low))}
    assert changed == {"high": ["blocks.0.self_attn.o.weight"], "low": ["blocks.1.self_attn.o.weight"]}
    with pytest.raises(ValueError, match="4 key.*belong to an expert of a two-expert model"):
        merged(sd)
    # diffusers names: with transformer_2. present, transformer. is the high-noise expert's
    sd = {k.replace("high_noise_model.blocks.0.self_attn.o", "transformer.blocks.0.attn1.to_out.0")
           .replace("low_noise_model.blocks.1.self_attn.o", "transformer_2.blocks.1.attn1.to_out.0"): v
          for k, v in sd.items()}
    for name, expert in (("high", "high_noise"), ("low", "low_noise")):
        m = model()
        merge_lora(m, [LoraEntry(sd)], expert=expert)
        assert [k for k, v in m.state_dict().items() if not torch.equal(v, base[k])] == changed[name]
