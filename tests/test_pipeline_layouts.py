"""Same seed, same video: single process == Ulysses 2 == CFG-parallel 2 (tiny model, fp32, CPU).

One spawn of 2 gloo ranks runs every multi-rank variant in turn (spawning costs seconds); the
single-process reference runs in the test process. Frames are compared as decoded floats
(before uint8 rounding) and as the uint8 frames that go into the mp4.
"""
import json
import os

import pytest
import torch

from lightx2v_sp.config import load_config
from lightx2v_sp.models import tiny
from lightx2v_sp.pipeline import AgreedError, run
from lightx2v_sp.testing import run_on_ranks

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
STEPS = 3
VARIANTS = {
    "ulysses2": ["parallel.ulysses_degree=2"],
    "cfg2": ["parallel.ulysses_degree=1", "parallel.cfg_degree=2"],
    "ulysses2_rr_tp": ["parallel.ulysses_degree=2", "parallel.a2a=round_robin", "parallel.fuse_qkv=false",
                       "text_encoder.parallel=tp"],
    "cfg2_dp": ["parallel.ulysses_degree=1", "parallel.cfg_degree=2", "text_encoder.parallel=dp"],
}
# Tolerances. Every layout computes the same fp32 math; what differs is how matmuls are blocked
# (a slice of S/2 tokens instead of S, heads split over ranks), which reorders fp32 sums: each
# op's relative error is ~1e-7 (fp32 epsilon), and the 2-layer DiT over 3 steps, with the
# guidance scale of 5 amplifying cond - uncond, and the VAE decoder add a few hundred of those.
# Observed: 0.0 for Ulysses or CFG-parallel alone, ~6e-6 with the tp/dp text encoder (its partial
# sums add up in another order). 1e-4 absolute on latents of scale ~4 and on frames in [-1, 1]
# leaves >10x headroom, while any real layout bug (a wrong token slice, RoPE position or swapped
# CFG pass) moves values by O(0.1-1). uint8 frames may differ by 1 at a rounding boundary.
ATOL = 1e-4


def _cfg(cache, out, extra):
    os.environ["LIGHTX2V_SP_CACHE"] = cache
    return load_config(CONFIG, [f"sample.steps={STEPS}", f"output.path={out}", *extra])


def _ranks(rank, world, cache, outdir):
    results = {}
    for name, extra in VARIANTS.items():
        res = run(_cfg(cache, f"{outdir}/{name}.mp4", extra), torch.device("cpu"), progress=False, keep_video=True)
        results[name] = {"latents": res.latents, "video": res.video, "summary": res.summary}
    # Errors seen by one rank only must stop both ranks (no hang) with the same message:
    # a model directory missing on rank 1 only (think: not mounted on one node) ...
    path = "null" if rank == 0 else f"{outdir}/not-mounted-here"
    results["errors"] = [_error_of(_cfg(cache, f"{outdir}/e.mp4", [f"model.path={path}"]))]
    # ... and an output directory only rank 0 checks (and would write)
    results["errors"].append(_error_of(_cfg(cache, "/proc/no/e.mp4", [])))
    return results


def _error_of(cfg):
    try:
        run(cfg, torch.device("cpu"), progress=False)
    except AgreedError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    tiny.ensure_tiny_model(cache)  # built once here; the ranks find it complete
    outdir = tmp_path_factory.mktemp("out")
    ref = run(_cfg(cache, f"{outdir}/single.mp4", ["parallel.ulysses_degree=1"]), torch.device("cpu"),
              progress=False, keep_video=True)
    ranks = run_on_ranks(_ranks, 2, cache, str(outdir), timeout=240)
    return ref, ranks, outdir


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layout_matches_single_process(runs, name):
    ref, ranks, _ = runs
    for rank in (0, 1):  # every rank ends with the same latents
        torch.testing.assert_close(ranks[rank][name]["latents"], ref.latents, atol=ATOL, rtol=0)
    assert ranks[1][name]["video"] is None  # every rank decodes its rows; only rank 0 holds the video
    video = ranks[0][name]["video"]
    assert video.shape == ref.video.shape == (3, 9, 64, 64)
    assert ref.video.std() > 0.05  # not a degenerate (constant) video that would match anything
    torch.testing.assert_close(video, ref.video, atol=ATOL, rtol=0)
    a = ((video + 1) * 127.5).round()
    b = ((ref.video + 1) * 127.5).round()
    assert (a - b).abs().max() <= 1


def test_cfg_ranks_run_different_passes(runs):
    """Guard against a CFG exchange that hands back the same pass twice: guidance must matter."""
    ref, _, outdir = runs
    cfg = load_config(CONFIG, [f"sample.steps={STEPS}", "sample.guidance_scale=1.0", "parallel.ulysses_degree=1",
                               f"output.path={outdir}/noguide.mp4"])
    plain = run(cfg, torch.device("cpu"), progress=False)
    assert (plain.latents - ref.latents).abs().max() > 1e-2


def test_summary_fields(runs):
    ref, ranks, outdir = runs
    with open(os.path.join(outdir, "ulysses2.json")) as f:
        s = json.load(f)
    assert s == json.loads(json.dumps(ranks[0]["ulysses2"]["summary"], default=str))
    assert s["output_path"] == os.path.join(str(outdir), "ulysses2.mp4") and os.path.isfile(s["output_path"])
    assert s["layout"]["world_size"] == 2 and s["layout"]["ulysses_degree"] == 2 and s["layout"]["cfg_degree"] == 1
    assert s["config"]["parallel"]["ulysses_degree"] == 2 and s["config"]["sample"]["steps"] == STEPS
    assert s["text"]["text_len"] == 32 and len(s["text"]["prompt_tokens"]) == 2  # prompt + negative prompt
    assert s["vae"]["pixel_rows_per_rank"] == [32, 32]  # 64 px high, decoded half by each rank
    assert set(s["memory_plan"]["gpu_bytes"]) == {"text", "denoise", "decode"}
    # "vae": what was left of the VAE's load, which ran during the denoise (prefetch.vae_loads_later)
    assert set(s["stage_times_s"]) == {"preflight", "text", "load", "denoise", "vae", "decode", "write"}
    assert all(t >= 0 for t in s["stage_times_s"].values())
    none = {"allocated_bytes": None, "reserved_bytes": None}  # CPU: no device memory counters
    assert s["peak_memory_bytes"]["rank0"]["decode"] == none
    assert [r["denoise"] for r in s["peak_memory_bytes"]["per_rank"]] == [none, none]
    # what took effect on this CPU run, not what the config asked for (auto, gpu placements)
    assert s["layout"]["attention_backend"] == "sdpa" and s["layout"]["attention_backend_requested"] == "auto"
    assert s["layout"]["text_encoder"] == {"parallel": "replicate", "device": "cpu"}
    assert s["layout"]["offload"] == {"dit": "cpu", "vae": "cpu"}
    assert [n.split(" ")[0] for n in s["layout"]["placement_notes"]] == ["text_encoder.device=gpu", "offload.vae=gpu"]
    rss = s["host_peak_rss_bytes"]["rank0"]  # a running maximum: never decreases from stage to stage
    assert list(rss) == ["preflight", "text", "load", "denoise", "vae", "decode", "write"]
    assert all(b > 50 * 2**20 for b in rss.values()) and list(rss.values()) == sorted(rss.values())
    assert [set(r) for r in s["host_peak_rss_bytes"]["per_rank"]] == [{"preflight", "text", "load", "denoise", "vae"}] * 2
    assert len(s["stage_times_s_per_rank"]) == 2 and "denoise" in s["stage_times_s_per_rank"][1]
    layers = tiny.TINY_WAN["num_layers"]
    forwards = STEPS * 2  # conditional + unconditional pass per step
    total = s["comm"]["total"]
    # per forward and rank: 2 all_to_all per self-attention (fused q|k|v in, output back), 1 gather of the head
    assert total["calls"]["all_to_all"] == 2 * forwards * layers * 2
    assert total["calls"]["all_gather"] == 2 * forwards
    assert len(s["comm"]["per_rank"]) == 2 and s["comm"]["per_rank"][0]["denoise"]["total_calls"] > 0

    c = ranks[0]["cfg2"]["summary"]["comm"]
    latent_bytes = ref.latents.numel() * 4  # fp32 predictions, one sent to the partner per step and rank
    assert c["total"]["calls"]["all_gather"] == 2 * STEPS
    assert c["total"]["bytes"]["all_gather"] == 2 * STEPS * latent_bytes
    assert [r["denoise"]["calls"] for r in c["per_rank"]] == [{"all_gather": STEPS}] * 2
    # the small control messages (errors agreed on at each checked stage) are counted too
    assert c["per_rank"][1]["preflight"]["calls"] == {"all_gather_object": 1}
    single = ref.summary
    assert single["layout"]["world_size"] == 1 and single["comm"]["total"]["total_calls"] == 0
    tp = ranks[0]["ulysses2_rr_tp"]["summary"]["comm"]["per_rank"][0]
    assert tp["text"]["total_calls"] > 0 and "sendrecv" in tp["denoise"]["calls"]


def test_one_rank_errors_stop_every_rank(runs):
    _, ranks, outdir = runs
    missing, unwritable = ranks[0]["errors"]
    assert ranks[1]["errors"] == [missing, unwritable]  # both ranks raised the same error
    assert "not-mounted-here is not a directory" in missing and missing.endswith("(on rank 1)")
    assert "not writable" in unwritable
    assert not os.path.exists(os.path.join(outdir, "e.mp4"))
