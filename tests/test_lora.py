"""LoRA adapters and distilled sampling, end to end against diffusers' own WanPipeline.

The reference is a tiny WanPipeline saved by diffusers, LoRAs made with peft and saved by
WanPipeline.save_lora_weights, loaded back with pipe.load_lora_weights(...) and run with pipe(...)
from the latents our run starts from. Our run merges the same files at load.

Tolerance on videos in [0, 1]: mean |difference| < 1e-3. Without a LoRA the two pipelines agree
to ~2e-7 mean (fp32: same math, different operation order). Merging a LoRA into the weights instead
of running it beside them (as PEFT does) changes rounding only, at fp32 ulps of O(1) values; the
4-step solvers and the VAE keep that near 1e-6. A wrong slice, scale or missing key moves the
video by more than 1e-2 (each test also checks the LoRA's own effect is that large), so 1e-3 sits
orders of magnitude from both.
"""
import json
import os

import pytest
import torch

from helpers import (load_pipeline, diffusers_video, make_peft_lora, our_video,
                                    save_diffusers_pipeline, to_kohya)
from lightx2v_sp.config import load_config
from lightx2v_sp.pipeline import run
from lightx2v_sp.testing import run_on_ranks

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
TOL = 1e-3
MIN_EFFECT = 1e-2
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
STEPS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora_e2e")
    pipe_dir = save_diffusers_pipeline(str(base / "pipe"))
    # LoRA A: every block linear and four top-level ones, alpha 8 / rank 4 with a per-module alpha
    # pattern for to_k, and lora_B biases; LoRA B: attention only, rank 2, alpha 8.
    a = make_peft_lora(str(base / "a"), ATTN + ["net.0.proj", "net.2", "proj_out", "time_proj", "linear_1"],
                       rank=4, alpha=8.0, seed=11, lora_bias=True, alpha_pattern={"to_k": 4.0})
    b = make_peft_lora(str(base / "b"), ATTN, rank=2, alpha=8.0, seed=12)
    return {"pipe": pipe_dir, "a": a, "b": b, "a_kohya": to_kohya(a, str(base / "a_kohya.safetensors")),
            "base": base}


def _cfg(files, tmp_path, name, *overrides):
    return load_config(CONFIG, [f"model.path={files['pipe']}", f"sample.steps={STEPS}", "parallel.ulysses_degree=1",
                                f"output.path={tmp_path}/{name}.mp4", *overrides])


def _ours(cfg):
    return our_video(run(cfg, torch.device("cpu"), progress=False, keep_video=True))


def _theirs(files, cfg, loras, forwards=None, euler_timesteps=None):
    pipe = load_pipeline(files["pipe"])
    names = []
    for i, (path, _) in enumerate(loras):
        names.append(f"l{i}")
        pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=names[-1])
    if loras:
        pipe.set_adapters(names, [scale for _, scale in loras])
    if euler_timesteps is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.sample.shift)
        set_timesteps = sched.set_timesteps  # WanPipeline passes a step count; the list goes in as sigmas
        sched.set_timesteps = lambda *a, device=None, **k: set_timesteps(
            sigmas=[t / 1000 for t in euler_timesteps], device=device)
        pipe.scheduler = sched
    return diffusers_video(pipe, cfg, forwards)


def _mean_diff(x, y, label=""):
    d = (x - y).abs().mean().item()
    if label:
        print(f"{label}: mean |difference| {d:.2e}")  # measured values, for the record (pytest -s)
    return d


def test_diffusers_and_kohya_files_match_diffusers(files, tmp_path):
    plain = _ours(_cfg(files, tmp_path, "plain"))
    ref = _theirs(files, _cfg(files, tmp_path, "ref"), [(files["a"], 1.0)])
    for name in ("a", "a_kohya"):
        ours = _ours(_cfg(files, tmp_path, name, f"lora=[{{path: {files[name]}}}]"))
        assert _mean_diff(ours, ref, f"ours({name}) vs diffusers") < TOL, name
    # the LoRA matters: the comparison is not vacuous
    assert _mean_diff(plain, ref, "no LoRA vs diffusers with LoRA") > MIN_EFFECT
    # diffusers reads the kohya file to the same adapter (a check of the test's own conversion)
    assert _mean_diff(_theirs(files, _cfg(files, tmp_path, "k"), [(files["a_kohya"], 1.0)]), ref) < TOL


def _two_loras_on_ranks(rank, world, files, out):
    """Ulysses 2 and CFG-parallel 2 in one spawn; the kohya copy of the first LoRA for variety."""
    torch.set_num_threads(1)
    videos = []
    for name, layout in (("ulysses", ["parallel.ulysses_degree=2"]),
                         ("cfgpar", ["parallel.ulysses_degree=1", "parallel.cfg_degree=2"])):
        cfg = load_config(CONFIG, [f"model.path={files['pipe']}", f"sample.steps={STEPS}", *layout,
                                   f"output.path={out}/{name}.mp4", f"lora=[{{path: {files['a_kohya']}, scale: 0.8}}, "
                                                                    f"{{path: {files['b']}, scale: -1.5}}]"])
        result = run(cfg, torch.device("cpu"), progress=False, keep_video=True)
        videos.append(our_video(result) if rank == 0 else None)
    return videos


def test_two_loras_with_scales_one_process_and_two_ranks(files, tmp_path):
    loras = [(files["a"], 0.8), (files["b"], -1.5)]
    ref = _theirs(files, _cfg(files, tmp_path, "ref2"), loras)
    one_a = _theirs(files, _cfg(files, tmp_path, "ref1"), loras[:1])
    ours = _ours(_cfg(files, tmp_path, "two", f"lora=[{{path: {files['a']}, scale: 0.8}}, "
                                               f"{{path: {files['b']}, scale: -1.5}}]"))
    assert _mean_diff(ours, ref, "two LoRAs, 1 process") < TOL
    assert _mean_diff(one_a, ref, "first LoRA only vs both") > MIN_EFFECT  # the second adapter matters
    ulysses, cfg_parallel = run_on_ranks(_two_loras_on_ranks, 2, files, str(tmp_path), timeout=180)[0]
    assert _mean_diff(ulysses, ref, "two LoRAs, 2 gloo ranks, ulysses 2") < TOL
    assert _mean_diff(cfg_parallel, ref, "two LoRAs, 2 gloo ranks, cfg_degree 2") < TOL
    summary = json.loads((tmp_path / "ulysses.json").read_text())
    assert [(e["scale"], e["tensors_updated"]) for e in summary["lora"]] == [(0.8, 48), (-1.5, 16)]  # weights + biases
    # CFG-parallel: one forward per rank per step; sequential CFG would be two
    assert json.loads((tmp_path / "cfgpar.json").read_text())["denoise"]["dit_forwards_per_rank"] == [STEPS, STEPS]


def test_distilled_sampling_one_forward_per_step(files, tmp_path):
    """guidance_scale 1 + euler + an explicit step list: one DiT forward per step, no negative prompt."""
    steps = [1000, 750, 500, 250]
    cfg = _cfg(files, tmp_path, "distill", "sample.guidance_scale=1", "sample.scheduler=euler", "sample.steps=4",
               "sample.timesteps=[1000,750,500,250]", f"lora=[{{path: {files['a']}}}]")
    ours = _ours(cfg)
    forwards = []
    ref = _theirs(files, cfg, [(files["a"], 1.0)], forwards=forwards, euler_timesteps=steps)
    assert _mean_diff(ours, ref, "distilled 4-step euler, guidance 1") < TOL
    summary = json.loads((tmp_path / "distill.json").read_text())
    assert summary["denoise"]["dit_forwards"] == 4 == len(forwards)
    assert summary["denoise"]["dit_forwards_per_rank"] == [4]
    assert len(summary["text"]["prompt_tokens"]) == 1  # the negative prompt was not encoded
    # shift 3 maps t/1000 = 0.75 to 0.9 (3s / (1 + 2s)): the list is shifted like the default schedule
    assert summary["denoise"]["timesteps"] == [1000.0, 900.0, 750.0, 500.0]
    with_cfg = _cfg(files, tmp_path, "cfg", "sample.scheduler=euler", "sample.steps=4")
    run(with_cfg, torch.device("cpu"), progress=False)
    assert json.loads((tmp_path / "cfg.json").read_text())["denoise"]["dit_forwards"] == 8
