"""Every shipped config at its real shapes on the CPU (the dry run), and the real-shape defects of
issue 28 it exists to catch: the plan's strides (28.1), two experts (28.2), block offload's sizes
(28.3), `--gpus 0`. The model shapes are the released checkpoints' config files (tests/fixtures/hub,
no weights); the DiT, UMT5 and VAE run on the meta device."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lightx2v_sp.config import load_config
from lightx2v_sp.dryrun import GIB, card_gib, check_configs, dry_run, format_rows, intended_world
from lightx2v_sp.plan import USABLE, dit_bytes, fits, make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# zeros at the shapes of a Wan2.1-T2V-14B LoRA (rank 1; attention and FFN of blocks 0 and 39): the
# distill configs name a LoRA file the user sets, this one stands in for it
SHAPES_LORA = os.path.join(ROOT, "tests", "fixtures", "loras", "wan21_t2v_14b_shapes_lora.safetensors")


@pytest.fixture(autouse=True)
def _real_configs(real_configs):
    return real_configs


def _cfg(name, *overrides):
    return load_config(os.path.join(CONFIGS, name), list(overrides))


def _lora_for(name):
    return [f"lora.0.path={SHAPES_LORA}"] if "distill" in name else []


def _denoise(rank):
    return next(s for s in rank.stages if s.stage == "denoise")


def test_every_shipped_config_dry_runs_and_fits_its_card(capsys):
    paths = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
    for p in paths:  # the multi-GPU configs are laid out for the 8 GPUs they name
        name = os.path.basename(p)
        if {"8gpu", "4090x8"} & set(name[:-len(".yaml")].split("_")):  # `_4090x8_offload` too
            assert intended_world(load_config(p, [])) == 8, name
    rows = check_configs(paths, _lora_for)  # raises on the first config whose dry run fails
    with capsys.disabled():
        print("\n" + format_rows(rows))
    assert len(rows) == len(paths) >= 26
    assert [r[0] for r in rows if r[4] != "yes"] == []  # every config fits the card it is written for


def test_cli_dry_run_prints_checks_and_plan(capsys):
    from lightx2v_sp.generate import EXIT_USER_ERROR, main

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=os.path.join(ROOT, "tests", "fixtures", "hub"),
               PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "lightx2v_sp.generate", "--config",
           os.path.join(CONFIGS, "wan22_t2v_a14b_720p_4090x8.yaml"), "--dry-run", "--gpu-memory", "24"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wan2.2-t2v-a14b, 2 expert(s) of 40 blocks" in out.stdout
    assert "latents [16, 21, 90, 160] -> tokens [21, 45, 80] = 75600, per rank [18900]" in out.stdout
    # model.quant=fp8 in this config: both experts' blocks as e4m3 + per-row scales (bf16: 52.37 GiB)
    assert "shared host copy: 26.21 GiB of blocks for 2 expert(s)" in out.stdout
    assert "fits 24.00 GiB" in out.stdout
    # a failing check is one error line and status 2 (in this process: the CLI's own main)
    assert main(["--config", os.path.join(CONFIGS, "wan22_t2v_a14b_720p_8gpu.yaml"), "--dry-run", "--gpus", "3"]) \
        == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "error: the layout: " in err


# --- issue 28.1: the plan takes every stride from the model's kind -------------------------------

def test_ti2v_plan_uses_the_kinds_strides():
    cfg = _cfg("wan22_ti2v_5b_720p.yaml")
    shapes, ranks = make_plan(cfg, 1)
    decode = next(s for s in ranks[0].stages if s.stage == "decode")
    assert decode.gpu["video rows"] == 3 * 121 * 704 * 1280 * 4  # the video's own pixels (today: 4x)
    assert ranks[0].gpu_peak < USABLE * 80 * GIB  # today 131.79 GiB: refused on any GPU
    assert 30 * GIB < ranks[0].gpu_peak < 40 * GIB  # the Wan2.1-calibrated whole-frame estimate at 704x1280x121
    from lightx2v_sp.pipeline.geometry import video_geometry

    geo = video_geometry(shapes.kind, shapes.dit, cfg.sample)
    assert geo.strides == (4, 16) and geo.latent == (48, 31, 44, 80) and geo.tokens == 31 * 22 * 40
    dit = shapes.dit
    assert _denoise(ranks[0]).gpu["DiT activations"] == int(geo.tokens * (7.2 * dit.dim + 1.62 * dit.ffn_dim) * 2)


# --- issue 28.2: two-expert models are planned with both DiTs -----------------------------------

@pytest.mark.parametrize("path", [None, "Wan-AI/Wan2.2-T2V-A14B-Diffusers"])  # official and diffusers layouts
def test_two_experts_are_planned_with_both(path):
    extra = [f"model.path={path}"] if path else []
    shapes, resident = make_plan(_cfg("wan22_t2v_a14b_720p_8gpu.yaml", *extra), 8)
    assert not fits(resident, 48 * GIB) and fits(resident, 80 * GIB)  # today it "fits" 48 GB at 28.7 GiB
    one = dit_bytes(shapes.dit, "bf16")
    assert _denoise(resident[0]).gpu["DiT (2 experts)"] == 2 * one["resident"]  # 2 x 26.6 GiB
    _, block = make_plan(_cfg("wan22_t2v_a14b_720p_8gpu.yaml", "offload.dit=block", "offload.share_host=false",
                              *extra), 8)
    assert _denoise(block[0]).host["DiT blocks, pinned (2 experts)"] == 2 * one["blocks"]
    assert _denoise(block[0]).gpu["DiT (non-block + 2 blocks) (2 experts)"] == 2 * one["other"] + 2 * one["block"]
    _, swap = make_plan(_cfg("wan22_t2v_a14b_720p_8gpu.yaml", "offload.dit=swap", *extra), 8)
    assert _denoise(swap[0]).host["DiT, pinned (2 experts)"] == 2 * one["resident"]
    assert _denoise(swap[0]).gpu["DiT (active expert)"] == one["resident"]


# --- issue 28.3: block offload sizes the shared copy from the resolved checkpoint, all experts -----

@pytest.mark.parametrize("name, experts", [("wan22_t2v_a14b_720p_4090x8.yaml", 2),  # official: high_noise_model/
                                           ("wan21_i2v_14b_480p_4090x8.yaml", 1),   # I2V blocks (image branch)
                                           ("wan22_ti2v_5b_720p_4090x8.yaml", 1)])  # no "14b" in any name
def test_shared_copy_is_sized_from_the_resolved_configs(name, experts, monkeypatch):
    from lightx2v_sp.dryrun_meta import observe_placement
    from lightx2v_sp.offload import shared_host
    from lightx2v_sp.pipeline.denoise import blocks_from_local_rank0
    from lightx2v_sp.pipeline.experts import shared_copy_bytes
    from lightx2v_sp.pipeline.kind import boundary_ratio, detect_kind
    from lightx2v_sp.pipeline.paths import model_paths_for
    from lightx2v_sp.plan import shapes_of

    cfg = _cfg(name, "offload.dit=block", "model.compile=false")  # some 4090x8 configs compile (fp8, resident)
    paths = model_paths_for(cfg.model, weights=False)
    kind = detect_kind(paths)
    counted = shared_copy_bytes(kind.experts, cfg)
    arenas = observe_placement(shapes_of(paths, kind).experts, cfg, boundary_ratio(kind, cfg.sample))["block_arenas"]
    assert len(arenas) == experts and counted == sum(arenas)  # what BlockOffload will ask /dev/shm for
    # a node rank skips reading its blocks only when every expert's arena fits /dev/shm
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 1)
    monkeypatch.setattr(shared_host, "_shm_free_bytes", lambda: arenas[0] + 1)
    assert blocks_from_local_rank0(cfg, cuda, counted) is (experts == 1)
    monkeypatch.setattr(shared_host, "_shm_free_bytes", lambda: sum(arenas))
    assert blocks_from_local_rank0(cfg, cuda, counted) is True


# --- issue 28.11: --gpus 0 is an error, not "unset" ----------------------------------------------

@pytest.mark.parametrize("flag, gpus", [("--plan", "0"), ("--dry-run", "0"), ("--plan", "-2"), ("--dry-run", "-1")])
def test_gpus_zero_or_negative_is_an_error(flag, gpus, capsys):
    from lightx2v_sp.generate import EXIT_USER_ERROR, main

    assert main(["--config", os.path.join(CONFIGS, "wan_t2v_tiny.yaml"), flag, "--gpus", gpus]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"--gpus {gpus} must be >= 1" in err and err.count("error:") == 1


# --- the dry run's checks have teeth -------------------------------------------------------------

def test_dry_run_catches_a_plan_that_misses_an_expert(monkeypatch):
    import lightx2v_sp.plan as plan
    from lightx2v_sp.plan_sizes import Shapes

    real = plan.plan_rank

    def one_expert(cfg, shapes, world, rank):  # the plan of today: the first expert only
        return real(cfg, Shapes(shapes.name, shapes.dit, shapes.t5, shapes.vae, shapes.kind), world, rank)

    monkeypatch.setattr(plan, "plan_rank", one_expert)
    with pytest.raises(ValueError, match=r"the memory plan counts 26\.\d+ GiB of DiT weights on the GPU .* "
                                         r"places 53\.\d+ GiB there for 2 expert"):
        dry_run(_cfg("wan22_t2v_a14b_720p_8gpu.yaml"), 8, 80 * GIB)


def test_dry_run_catches_a_vae_stride_the_model_does_not_have(tmp_path):
    from lightx2v_sp.pipeline.hub import resolve_path

    src = resolve_path("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model", configs_only=True)
    model = tmp_path / "model"
    shutil.copytree(src, model)
    vae = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps(dict(vae, scale_factor_spatial=16)))  # Wan2.1 VAE: 8
    with pytest.raises(ValueError, match=r"the VAE decode \(rank 0\): AssertionError: .*240, 416.*\[480\]"):
        dry_run(_cfg("wan_t2v_1.3b_480p.yaml", f"model.path={model}"), 1, 80 * GIB)


def test_dry_run_catches_a_lora_of_another_model_size():
    cfg = _cfg("wan_t2v_1.3b_480p.yaml", f"lora=[{{path: {SHAPES_LORA}}}]")  # a 14B LoRA on the 1.3B DiT
    with pytest.raises(ValueError, match=r"the LoRA keys: .* match no layer of this Wan DiT: "
                                         r"diffusion_model\.blocks\.39\."):
        dry_run(cfg, 1, 80 * GIB)


def test_cards():
    assert card_gib("wan_t2v_14b_720p_4090x8.yaml") == 24 and card_gib("wan_t2v_14b_720p_8gpu.yaml") == 80
    # a variant's suffix after the card (the offload variant of the 4090 config) is still for the 4090
    assert card_gib("wan_t2v_14b_720p_4090x8_offload.yaml") == 24 and card_gib("wan_t2v_14b_720p_8gpu_fp8.yaml") == 80
