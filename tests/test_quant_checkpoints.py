"""FP8 DiT checkpoints end to end: community files through model.dit_path, quantize-on-load, bad files.

The DiT is the embedded tiny one with rows of very different magnitudes (helpers.spread_rows: q and k
rows over 6 decades, undone by their RMSNorm weights), so per-channel scales are what keeps small rows.

- Each pre-quantized format (plain cast, ComfyUI scaled_fp8, ComfyUI comfy_quant and its header-metadata
  form, LightX2V per-channel; with and without the model.diffusion_model. / diffusion_model. prefixes) gives
  the video of the same model with the dequantized weights written as an ordinary fp32 checkpoint. The
  weight-only path computes q.float() * scale in fp32, the same product the reference file stores, so the
  weights are identical: latents agree to fp32 noise (observed 0 on one process; Ulysses / CFG-parallel
  only reorder the same fp32 operations, observed <= 1e-6). ATOL = 2e-5 on O(1) latents.
- Quantize-on-load against the unquantized fp32 run: e4m3 rounds each weight by up to 2^-4 (rms ~2.5%);
  on this model the final latents move by 0.06-0.07 relative L2 (seeds 0-2; 0.005 on the unspread tiny
  DiT, whose small rows do not carry signal). A scale per tensor instead of per row flushes the small
  rows (0.24-0.27), a scale applied along the input axis of square layers 0.48, an ignored scale ~2.
  BOUND = 0.15 sits 2x above the first and 1.6x below the nearest mistake.
"""
import json
import os

import pytest
import torch

from helpers import (FP8_FORMATS, community_fp8, dequantized, spread_rows, tiny_dit_state,
                     write_safetensors)
from lightx2v_sp.config import load_config
from lightx2v_sp.models.quant import fp8 as fp8_module
from lightx2v_sp.models.wan import load_wan
from lightx2v_sp.models.tiny import ensure_tiny_model
from lightx2v_sp.pipeline import run
from lightx2v_sp.testing import run_on_ranks

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
ATOL = 2e-5
BOUND = 0.15
PREFIX = {"plain": "", "scaled_fp8": "model.diffusion_model.", "comfy_quant": "diffusion_model.",
          "comfy_metadata": "model.diffusion_model.", "lightx2v": ""}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("fp8")
    state = spread_rows(tiny_dit_state(), decades=6)
    out = {"fp32": write_safetensors(state, str(base / "spread_fp32.safetensors")), "base": base}
    for fmt in FP8_FORMATS:
        tensors, meta = community_fp8(state, fmt, PREFIX[fmt])
        out[fmt] = write_safetensors(tensors, str(base / f"{fmt}_fp8_e4m3fn.safetensors"), meta)
        out[fmt + "_ref"] = write_safetensors(dequantized(tensors, PREFIX[fmt]), str(base / f"{fmt}_ref.safetensors"))
    return out


def _run(tmp, name, *overrides, rank_dir=None):
    cfg = load_config(CONFIG, [f"output.path={tmp}/{name}.mp4", "parallel.ulysses_degree=1", *overrides])
    return run(cfg, torch.device("cpu"), progress=False).latents


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_format_gives_the_dequantized_checkpoints_video(files, tmp_path, fmt):
    ours = _run(tmp_path, fmt, f"model.dit_path={files[fmt]}", "model.quant=fp8")
    ref = _run(tmp_path, "ref", f"model.dit_path={files[fmt + '_ref']}")
    assert (ours - ref).abs().max() <= ATOL
    summary = json.loads((tmp_path / f"{fmt}.json").read_text())["quant"]
    source = summary["dit"][0]["source"]
    assert {"plain": "plain fp8", "scaled_fp8": "scaled_fp8", "comfy_quant": "ComfyUI quantized",
            "comfy_metadata": "ComfyUI quantized", "lightx2v": "LightX2V"}[fmt] in source
    assert summary["dit"][0]["matmul"] == {"weight-only (dequantized per layer to the compute dtype)": 14}
    assert summary["dit"][0]["fp8_accum"] == {"fast": 0, "exact": 0}  # no FP8 GEMM on the CPU


def _formats_on_ranks(rank, world, files, tmp):
    out = []
    for fmt, layout in (("scaled_fp8", ["parallel.ulysses_degree=2"]),
                        ("lightx2v", ["parallel.ulysses_degree=1", "parallel.cfg_degree=2"])):
        cfg = load_config(CONFIG, [f"output.path={tmp}/{fmt}_ranks.mp4", f"model.dit_path={files[fmt]}",
                                   "model.quant=fp8", *layout])
        out.append(run(cfg, torch.device("cpu"), progress=False).latents)
    return out


def test_formats_on_two_gloo_ranks(files, tmp_path):
    refs = [_run(tmp_path, "ref", f"model.dit_path={files[f + '_ref']}") for f in ("scaled_fp8", "lightx2v")]
    results = run_on_ranks(_formats_on_ranks, 2, {k: v for k, v in files.items() if k != "base"}, str(tmp_path),
                           timeout=180)
    for per_rank in results:
        for ours, ref in zip(per_rank, refs):
            assert (ours - ref).abs().max() <= ATOL


def _plant(monkeypatch, mistake):
    right_scales, right_dequantize = fp8_module.row_scales, fp8_module.dequantize
    if mistake == "per_tensor_scale":
        monkeypatch.setattr(fp8_module, "row_scales", lambda amax: right_scales(amax.max().expand_as(amax)))
    elif mistake == "transposed_scale":  # silent only where the layer is square (else a shape error)
        monkeypatch.setattr(fp8_module, "dequantize", lambda q, s, d: (q.float() * s.reshape(1, -1)).to(d)
                            if q.shape[0] == q.shape[1] else right_dequantize(q, s, d))
    elif mistake == "scale_ignored":
        monkeypatch.setattr(fp8_module, "dequantize", lambda q, s, d: q.float().to(d))


@pytest.fixture(scope="module")
def unquantized(files, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("unq"), "fp32", f"model.dit_path={files['fp32']}")


@pytest.mark.parametrize("mistake", [None, "per_tensor_scale", "transposed_scale", "scale_ignored"])
def test_quantize_on_load_is_close_and_planted_mistakes_break_the_bound(files, unquantized, tmp_path,
                                                                         monkeypatch, mistake):
    _plant(monkeypatch, mistake)
    err = _rel(_run(tmp_path, "q", f"model.dit_path={files['fp32']}", "model.quant=fp8"), unquantized)
    if mistake is None:
        assert 1e-3 < err < BOUND, err  # the weights really were rounded, and not by much
        summary = json.loads((tmp_path / "q.json").read_text())["quant"]["dit"][0]
        assert summary["source"] == "full precision, quantized per output channel while loading"
    else:
        assert err > BOUND, (mistake, err)


def test_two_experts_take_one_file_each(tmp_path):
    """Wan2.2 A14B: dit_path (high noise) and dit_path_2 (low noise), each in its own format."""
    root = ensure_tiny_model(variant="wan2.2-t2v-a14b")
    paths = {}
    for expert, fmt in (("high_noise_model", "lightx2v"), ("low_noise_model", "scaled_fp8")):
        tensors, meta = community_fp8(tiny_dit_state("wan2.2-t2v-a14b", expert), fmt, PREFIX[fmt])
        paths[expert] = write_safetensors(tensors, str(tmp_path / f"{expert}.safetensors"), meta)
        paths[expert + "_ref"] = write_safetensors(dequantized(tensors, PREFIX[fmt]), str(tmp_path / f"{expert}_r.st"))
    common = ["model.tiny=wan2.2-t2v-a14b", "sample.steps=4"]
    ours = _run(tmp_path, "a14b", *common, "model.quant=fp8", f"model.dit_path={paths['high_noise_model']}",
                f"model.dit_path_2={paths['low_noise_model']}")
    ref = _run(tmp_path, "a14b_ref", *common, f"model.dit_path={paths['high_noise_model_ref']}",
               f"model.dit_path_2={paths['low_noise_model_ref']}")
    assert (ours - ref).abs().max() <= ATOL
    summary = json.loads((tmp_path / "a14b.json").read_text())
    assert [d["source"].split(":")[0] for d in summary["quant"]["dit"]] == [
        "per-channel weight_scale (LightX2V)", "ComfyUI scaled_fp8 (scale_weight per tensor)"]
    assert summary["experts"]["switches"] == 1 and os.path.isdir(root)
    with pytest.raises(ValueError, match="two experts: give model.dit_path"):
        _run(tmp_path, "one", *common, "model.quant=fp8", f"model.dit_path={paths['high_noise_model']}")


# --- bad files: one ValueError naming the file and the key, before anything is denoised ----------------

def _bad(tmp_path, files, edit, quant="fp8"):
    from safetensors.torch import load_file

    tensors = load_file(files["comfy_quant"])
    meta = {}
    edit(tensors, meta)
    path = write_safetensors(tensors, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(ValueError) as err:
        load_wan(ensure_tiny_model(), dtype=torch.float32, weights=path, quant=quant)
    assert path in str(err.value)
    return str(err.value)


K = "diffusion_model.blocks.0.self_attn.q"
BAD = {
    "scale of the wrong shape": (lambda t, m: t.update({K + ".weight_scale": torch.ones(3)}), "scale of shape (3,)"),
    "scale without its weight": (lambda t, m: t.update({"diffusion_model.blocks.0.foo.weight_scale": torch.ones(())}),
                                 "without its weight"),
    "NaN scale": (lambda t, m: t.update({K + ".weight_scale": torch.tensor(float("nan"))}), "NaN, inf or a value <= 0"),
    "negative scale": (lambda t, m: t.update({K + ".weight_scale": torch.tensor(-1.0)}), "value <= 0"),
    "NaN in an fp8 weight": (lambda t, m: t[K + ".weight"].view(torch.uint8).__setitem__((0, 0), 0x7F),
                             "fp8 weight holds NaN"),
    "inf in a bf16 weight": (lambda t, m: t.update({K + ".weight": torch.full((96, 96), float("inf")).bfloat16()}),
                             "holds NaN or inf"),
    "nvfp4 layer": (lambda t, m: t.update({K + ".comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'),
                                                                           dtype=torch.uint8)}), "'nvfp4'"),
    "e5m2 weight": (lambda t, m: t.update({K + ".weight": t[K + ".weight"].float().to(torch.float8_e5m2)}),
                    "float8_e5m2"),
    "missing key": (lambda t, m: t.pop("diffusion_model.blocks.1.ffn.2.bias"), "missing keys: blocks.1.ffn.2.bias"),
    "wrong shape": (lambda t, m: t.update({"diffusion_model.blocks.1.ffn.2.bias": torch.zeros(5)}),
                    "blocks.1.ffn.2.bias: checkpoint has shape (5,)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fp8_file_is_one_error_naming_file_and_key(files, tmp_path, case):
    edit, expected = BAD[case]
    message = _bad(tmp_path, files, edit)
    assert expected in message, message


def test_fp8_file_with_quant_null_is_refused(files, tmp_path):
    message = _bad(tmp_path, files, lambda t, m: None, quant=None)
    assert "stored as float8_e4m3fn" in message and "set model.quant=fp8" in message


def test_cli_fp8_file_without_quant_is_one_error_line(files, tmp_path):
    """As a user sees it: one `error:` line naming the file and the key, exit 1, no video."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lightx2v_sp.generate", "--config", CONFIG, f"output.path={tmp_path}/c.mp4",
                        f"model.dit_path={files['lightx2v']}"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert files["lightx2v"] in errors[0] and "weight' is stored as float8_e4m3fn" in errors[0], errors[0]
    assert not (tmp_path / "c.mp4").exists()


def test_missing_dit_path_is_a_preflight_error(tmp_path):
    with pytest.raises(ValueError, match="missing.safetensors' does not exist"):
        _run(tmp_path, "m", f"model.dit_path={tmp_path}/missing.safetensors", "model.quant=fp8")
    with pytest.raises(ValueError, match="dit_path_2 .* is for two-expert models"):
        _run(tmp_path, "m", f"model.dit_path={tmp_path}", f"model.dit_path_2={tmp_path}")


def test_lora_on_an_fp8_dit(tmp_path):
    """The tiny LoRA merged into fp8 layers (dequantize, add, quantize again) against the same LoRA in
    fp32: 0.0067 relative L2 (e4m3 rounding of the merged weights; 0.005 without the LoRA). 0.015 is
    2x that and half of the LoRA's own effect (0.033), so a LoRA lost or doubled in fp8 fails it."""
    lora = "lora=[{path: tiny, scale: 1.0}]"
    ref = _run(tmp_path, "lora", lora)
    ours = _run(tmp_path, "lora8", lora, "model.quant=fp8")
    assert _rel(ours, ref) < 0.015 < _rel(_run(tmp_path, "none"), ref)
    assert json.loads((tmp_path / "lora8.json").read_text())["lora"][0]["tensors_updated"] > 0
