"""The memory plan (lightx2v_sp/plan.py): its formulas against the H100 calibration numbers, its
monotonicity, exact weight counts, the --plan CLI and the pre-load check."""
import os

import pytest
import torch

from lightx2v_sp.config import load_config
from lightx2v_sp.pipeline.decode import row_bands
from lightx2v_sp.plan import GIB, check_before_loading, make_plan, vae_decode_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


@pytest.fixture(autouse=True)
def _real_configs(real_configs):  # the configs' repo ids resolve to the released config files
    return real_configs


def _cfg(name, *overrides):
    return load_config(os.path.join(CONFIGS, name), list(overrides))


def _decode_gib(h, w, dtype_bytes, bands, receive=0):
    return sum(vae_decode_bytes({}, (h // 8, w // 8), 81, dtype_bytes, bands, receive).values()) / GIB


@pytest.mark.parametrize("h, w, dtype_bytes, measured", [
    (480, 832, 4, 9.26), (720, 1280, 4, 20.71), (480, 832, 2, 4.63), (720, 1280, 2, 10.36)])
def test_whole_frame_decode_matches_h100_peaks(h, w, dtype_bytes, measured):
    # Calibrated on 480p fp32 only; 720p and bf16 are predictions of the same formula. 2%: the
    # measured 720p/480p ratio (2.236) and the pixel ratio (2.308) differ by a fixed part. The
    # measurements had the whole VAE on the GPU; the decode now leaves the encoder on the host.
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        encoder = sum(p.numel() for p in AutoencoderKLWan().encoder.parameters()) * dtype_bytes / GIB
    assert _decode_gib(h, w, dtype_bytes, [(0, h // 8)]) == pytest.approx(measured - encoder, rel=0.02)


def test_split_decode_shrinks_with_ranks():
    per_rank = []
    for n in (1, 2, 4, 8):
        layout = row_bands(90, n)
        per_rank.append(max(_decode_gib(720, 1280, 4, bands) for bands in layout))
        # halo rows are decoded twice: the ranks together hold more than one whole-frame decode
        assert sum(_decode_gib(720, 1280, 4, bands) for bands in layout) >= per_rank[0] * 0.999
    assert per_rank == sorted(per_rank, reverse=True) and len(set(per_rank)) == 4
    assert per_rank[3] < 4.2  # 720p fp32 over 8 ranks: the issue's <= 4 GiB target, predicted
    tiled = _decode_gib(720, 1280, 4, row_bands(90, 1, 4)[0])
    assert per_rank[2] < tiled < per_rank[0]  # 4 bands in turn: caches of one band, all of the video


def test_dit_stage_matches_h100_peaks():
    # calibration points (BENCHMARKS.md): 1.3B / 14B at 480p, resident and block offload; the
    # activation formula is one least-squares line through both models, hence 7%
    for name, offload, measured in [("wan_t2v_1.3b_480p.yaml", "none", 4.21), ("wan_t2v_1.3b_480p.yaml", "block", 1.78),
                                    ("wan_t2v_14b_720p.yaml", "none", 30.27), ("wan_t2v_14b_720p.yaml", "block", 5.32)]:
        cfg = _cfg(name, f"offload.dit={offload}", "sample.height=480", "sample.width=832")
        _, ranks = make_plan(cfg, 1)
        denoise = next(s for s in ranks[0].stages if s.stage == "denoise")
        assert denoise.gpu_total / GIB == pytest.approx(measured, rel=0.07), (name, offload)


def test_weights_are_counted_exactly():
    from lightx2v_sp.models.tiny import TINY_WAN
    from lightx2v_sp.models.wan import WanConfig, WanModel

    cfg = _cfg("wan_t2v_tiny.yaml")
    _, ranks = make_plan(cfg, 1)
    model = WanModel(WanConfig(**TINY_WAN))
    numel = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert ranks[0].stages[1].gpu["DiT"] == numel * 4  # tiny config runs in fp32


def test_decode_stage_is_the_whole_formula():
    # the stage table must carry every term of vae_decode_bytes (caches included)
    _, ranks = make_plan(_cfg("wan_t2v_1.3b_480p.yaml"), 1)
    decode = next(s for s in ranks[0].stages if s.stage == "decode")
    assert decode.gpu_total / GIB == pytest.approx(_decode_gib(480, 832, 4, [(0, 60)]), rel=1e-6)
    assert decode.gpu_total / GIB == pytest.approx(9.26 - 0.2, rel=0.01)  # measured - the encoder (host)


def test_more_ranks_less_memory_and_block_offload_moves_weights_to_host():
    cfg = _cfg("wan_t2v_14b_720p_8gpu.yaml")
    _, one = make_plan(_cfg("wan_t2v_14b_720p_8gpu.yaml", "parallel.cfg_degree=1", "parallel.ulysses_degree=1"), 1)
    _, eight = make_plan(cfg, 8)
    assert max(r.gpu_peak for r in eight) < one[0].gpu_peak
    _, offl = make_plan(_cfg("wan_t2v_14b_720p_8gpu.yaml", "offload.dit=block"), 8)
    assert offl[0].gpu_peak < eight[0].gpu_peak - 20 * GIB
    assert offl[0].host_peak > eight[0].host_peak + 20 * GIB  # the pinned blocks


def test_cli_prints_plan_and_exit_codes(capsys):
    from lightx2v_sp.generate import EXIT_DOES_NOT_FIT, EXIT_USER_ERROR, main

    assert main(["--config", os.path.join(CONFIGS, "wan_t2v_tiny.yaml"), "--plan", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "| rank | text GiB | denoise GiB | decode GiB |" in out and "Verdict: fits." in out
    code = main(["--config", os.path.join(CONFIGS, "wan_t2v_14b_720p_8gpu.yaml"), "--plan", "--gpus", "8",
                 "--gpu-memory", "24"])
    out = capsys.readouterr().out
    assert code == EXIT_DOES_NOT_FIT and "does NOT fit" in out and "set offload.dit=block" in out
    assert main(["--config", os.path.join(CONFIGS, "wan_t2v_14b_720p.yaml"), "--plan", "--gpus", "3"]) == EXIT_USER_ERROR
    assert "3 rank(s) and 40 heads" in capsys.readouterr().err


def test_run_stops_before_loading_when_the_plan_does_not_fit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * GIB, 24 * GIB))
    cfg = _cfg("wan_t2v_14b_720p_8gpu.yaml")
    with pytest.raises(ValueError, match=r"rank 0 needs about 28\.\d+ GiB .* denoise stage.*set offload\.dit=block"):
        check_before_loading(cfg, torch.device("cuda"), 8, 0)
    check_before_loading(_cfg("wan_t2v_14b_720p_8gpu.yaml", "memory_check=false"), torch.device("cuda"), 8, 0)
    check_before_loading(_cfg("wan_t2v_14b_720p_8gpu.yaml", "offload.dit=block"), torch.device("cuda"), 8, 0)


def test_block_offload_host_copy_is_counted_once_per_node():
    _, shared = make_plan(_cfg("wan_t2v_14b_720p_4090x8_offload.yaml"), 8)
    _, private = make_plan(_cfg("wan_t2v_14b_720p_4090x8_offload.yaml", "offload.share_host=false"), 8)
    blocks = private[0].stages[1].host["DiT blocks, pinned"]
    assert 24 * GIB < blocks < 28 * GIB  # Wan2.1-14B's 40 blocks in bf16
    assert sum(r.host_peak for r in private) - sum(r.host_peak for r in shared) == 7 * blocks


def test_a_model_the_plan_cannot_size_is_not_blocked(monkeypatch, tmp_path):
    from lightx2v_sp.plan import plan_summary

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * GIB, 1 * GIB))
    cfg = _cfg("wan_t2v_tiny.yaml", f"model.path={tmp_path}")  # a directory with no config and no size in its name
    check_before_loading(cfg, torch.device("cuda"), 1, 0)  # the plan advises; it cannot, so it stays quiet
    assert plan_summary(cfg, 1)["note"].startswith("no plan: model directory")
