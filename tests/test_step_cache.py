"""Step caching (pipeline/cache/): never-skip is bit-identical to no caching; a skipping threshold skips
the steps the method's rule says, and the same ones with the same video on 1 process, Ulysses 2 and 3
(gloo), CFG-parallel and block offload; calibration writes ratios a second run reads.

The tiny DiT has random weights, so its metrics are not those of a real model: thresholds here are
picked from the values these runs measure (printed in the summaries) so that skips really happen, and
away from every measured value (`_margin`), so fp32 sums over token slices cannot flip a decision.
Runs call `denoise` directly (12 steps, 175 tokens: not divisible by 2 or 3), the TeaCache one also with
Wan2.2 TI2V's per-token timesteps (its time embedding is then a token slice per rank, summed over the
group); one end-to-end run()
pair covers the config, the summary, the progress bar and the ratios file.
"""
import json
import os

import pytest
import torch
from helpers import LATENT, randomize_

from lightx2v_sp.config import load_config
from lightx2v_sp.distributed import ParallelDims
from lightx2v_sp.models import tiny
from lightx2v_sp.models.wan import WanConfig, WanModel
from lightx2v_sp.offload import HostTransport
from lightx2v_sp.pipeline import AgreedError, run
from lightx2v_sp.pipeline.cache import StepCache, cache_summary, resolve_cache
from lightx2v_sp.pipeline.cache import metrics as cache_metrics
from lightx2v_sp.pipeline.denoise import denoise
from lightx2v_sp.pipeline.experts import Experts, install_experts
from lightx2v_sp.pipeline.latents import initial_latents
from lightx2v_sp.pipeline.text import TextContexts
from lightx2v_sp.testing import run_on_ranks

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
STEPS = 12
IDENTITY = "cache.coefficients=[1.0,0.0]"  # TeaCache's polynomial as the identity: the metric is the raw change
# Picked from the measured metrics of these runs (see the module doc): first_block's relative change of
# block 0's residual is 0.09-0.18 per step (0.148: 3e-3 from the nearest; decided per token slice instead,
# 2 and 3 ranks disagree at it), TeaCache's time-embedding change 0.45-0.8 per step (the same bits on every
# layout: it does not depend on the tokens).
SKIPPING = {"first_block": ["cache.threshold=0.148"], "teacache": [IDENTITY, "cache.threshold=1.0"]}
# Ulysses and CFG-parallel compute the same fp32 math on token slices (observed: identical latents); 1e-4
# on latents of scale ~4 leaves the tolerance of the layout tests (test_pipeline_layouts.py), while a
# wrong decision on any rank moves them by O(0.01-1) (a skipped step differs from a computed one by that).
ATOL = 1e-4
PLANT = os.environ.get("LIGHTX2V_SP_PLANT_PER_RANK_CACHE_DECISIONS") == "1"  # demonstration only (see report)


def _cfg(*overrides):
    return load_config(CONFIG, [f"sample.steps={STEPS}", *overrides])


def _denoise(overrides, dims=None, transport=None, experts=None, device="cpu", ti2v=False):
    """(final latents, this rank's cache record, settings) of a 12-step run of the tiny DiT; `ti2v`: the
    Wan2.2 TI2V shape (48 channels) with a first frame, so every token has its own timestep."""
    dims = dims or ParallelDims()
    cfg = _cfg(*overrides)
    channels = 48 if ti2v else 16
    if experts is None:
        model = randomize_(WanModel(WanConfig.tiny(in_dim=channels, out_dim=channels)).eval(), 0).to(device)
        experts = install_experts([model], cfg, dims, torch.device(device), None, transport=transport)
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(2, 8, 64, generator=gen).to(device)
    contexts = TextContexts(cond=text[:1], uncond=text[1:], num_tokens=[8, 8])
    settings = resolve_cache(cfg, "wan2.2-ti2v-5b" if ti2v else "wan2.1-t2v", WanConfig.tiny().dim)
    start = _start().repeat(1, channels // 16, 1, 1, 1)
    image = {"first_frame": torch.randn(1, channels, 1, *LATENT[2:], generator=gen)} if ti2v else {}
    stats = {}
    latents = denoise(experts, start.to(device), contexts, cfg, dims, show_progress=False, stats=stats,
                      cache=StepCache(settings, dims) if settings else None, **image)
    return latents, stats.get("cache"), settings


def _start():
    """Initial latents with a nearly still region (the first 2 of 5 latent frames at 0.02x), so the token
    slices of different ranks change differently from step to step, as a real video's regions do. With
    uniform noise every slice's metric is within ~1e-3 of the whole sequence's, and a per-rank decision
    would be hard to tell from a global one."""
    start = initial_latents(3, LATENT)
    start[:, :, :2] *= 0.02
    return start


def _margin(record, threshold):
    """Smallest distance of a compared value to the threshold: decisions that close could flip."""
    return min(abs(v - threshold) for b in record["branches"].values() for v in b["metric"].values())


def _teacache_pattern(metric: dict, settings):
    """TeaCache's rule re-done on the recorded changes: accumulate, skip below the threshold, reset on compute."""
    skipped, acc = [], 0.0
    for step in range(settings.steps):
        if step < settings.start_steps or step >= settings.steps - settings.end_steps:
            acc = 0.0
            continue
        acc += metric[step]
        if acc < settings.threshold:
            skipped.append(step)
        else:
            acc = 0.0
    return skipped


def _magcache_pattern(ratios: list, settings):
    """MagCache's rule on the ratio table: multiply, accumulate |1 - product|, skip below E and at most K in a row."""
    skipped, ratio, err, run_ = [], 1.0, 0.0, 0
    for step in range(settings.start_steps, settings.steps - settings.end_steps):
        if run_ >= settings.max_skips:
            ratio, err, run_ = 1.0, 0.0, 0
            continue
        ratio *= ratios[step]
        err += abs(1 - ratio)
        if err < settings.threshold:
            skipped.append(step)
            run_ += 1
        else:
            ratio, err, run_ = 1.0, 0.0, 0
    return skipped


@pytest.fixture(scope="module")
def reference():
    return {name: _denoise(["cache.method=" + name, *extra]) for name, extra in SKIPPING.items()}


@pytest.fixture(scope="module")
def ratios_file(tmp_path_factory):
    """MagCache ratios of the tiny DiT from a calibration run, written as the runner writes them."""
    path = str(tmp_path_factory.mktemp("ratios") / "tiny.json")
    overrides = ["cache.method=magcache", "cache.calibrate=true", f"cache.ratios={path}"]
    latents, record, settings = _denoise(overrides)
    cache_summary(settings, [record], _cfg(*overrides), {"tiny": True})
    return path, latents, record


def test_never_skip_is_bit_identical(ratios_file):
    plain, record, _ = _denoise([])
    assert record is None
    path, calibrated, calibration = ratios_file
    assert torch.equal(calibrated, plain)  # calibration computes every step
    assert calibration["branches"]["cond"]["skipped"] == []
    for extra in (["cache.method=first_block"], ["cache.method=teacache", IDENTITY],
                  ["cache.method=magcache", f"cache.ratios={path}"]):
        latents, record, _ = _denoise([*extra, "cache.threshold=0"])
        assert torch.equal(latents, plain), extra
        assert all(b["skipped"] == [] and len(b["computed"]) == STEPS for b in record["branches"].values())
        if extra[0] != "cache.method=magcache":  # the metric is measured even when nothing can be skipped
            assert len(record["branches"]["cond"]["metric"]) == STEPS - 2


def test_skip_patterns_follow_each_methods_rule(reference, ratios_file):
    plain, _, _ = _denoise([])
    latents, record, settings = reference["teacache"]
    for branch in record["branches"].values():
        expected = _teacache_pattern(branch["metric"], settings)
        assert branch["skipped"] == expected and len(expected) >= 3, branch
    assert (latents - plain).abs().max() > 1e-3  # skipping changed the result: the reuse is real
    latents, record, _ = reference["first_block"]
    assert all(b["skipped"] == [1, 2, 3, 5, 6, 8] for b in record["branches"].values()), record
    assert (latents - plain).abs().max() > 1e-3
    # MagCache on the calibrated ratios: a threshold that skips some of the steps its table allows
    path, _, calibration = ratios_file
    with open(path) as f:
        table = json.load(f)
    assert table["steps"] == STEPS and table["cond"][0] == 1.0 and len(table["uncond"]) == STEPS
    assert table["cond"][1:] == [round(v, 6) for _, v in sorted(calibration["branches"]["cond"]["calibration"].items())]
    errors = sorted(abs(1 - r) for r in table["cond"][3:])
    threshold = round(errors[len(errors) // 2] * 1.5, 4)
    latents, record, settings = _denoise(["cache.method=magcache", f"cache.ratios={path}",
                                          f"cache.threshold={threshold}", "cache.max_skips=2"])
    for name, branch in record["branches"].items():
        expected = _magcache_pattern(table[name], settings)
        assert branch["skipped"] == expected and len(expected) >= 2, (name, branch, table[name])


def _layouts(rank, world, ratios_path):
    if PLANT:  # each rank decides on its own token slice: what the exchange prevents
        local = cache_metrics.sequence_sums
        cache_metrics.sequence_sums = lambda partials, group, size: local(partials, None, 1)
    out = {}
    for name, extra in SKIPPING.items():
        out[f"ulysses{world}-{name}"] = _denoise(["cache.method=" + name, *extra], ParallelDims(world))[:2]
    out[f"ulysses{world}-calibration"] = _denoise(["cache.method=magcache", "cache.calibrate=true",
                                                   f"cache.ratios={ratios_path}"], ParallelDims(world))[:2]
    if world == 2:
        out["ulysses2-ti2v-teacache"] = _denoise(["cache.method=teacache", *SKIPPING["teacache"]], ParallelDims(2),
                                                 ti2v=True)[:2]
        out["cfg2-first_block"] = _denoise(["cache.method=first_block", *SKIPPING["first_block"]],
                                           ParallelDims(1, 2))[:2]
        out["ulysses2-block_offload-first_block"] = _denoise(
            ["cache.method=first_block", *SKIPPING["first_block"], "offload.dit=block"], ParallelDims(2),
            transport=HostTransport())[:2]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_layouts_skip_the_same_steps_and_give_the_same_video(reference, ratios_file, tmp_path, world):
    _, calibrated, calibration = ratios_file
    ranks = run_on_ranks(_layouts, world, str(tmp_path / "unused.json"), timeout=180)
    # first_block's changes are fp32 sums over 175 x 96 values, added per slice then over the group:
    # ~1e-6 relative apart between layouts, far below this distance to the threshold
    _, single_record, settings = reference["first_block"]
    assert _margin(single_record, settings.threshold) > 1e-3
    ti2v = _denoise(["cache.method=teacache", *SKIPPING["teacache"]], ti2v=True)[:2] if world == 2 else None
    for variant in ranks[0]:
        method = variant.rsplit("-", 1)[1]
        single, single_record = (calibrated, calibration) if method == "calibration" else \
            ti2v if "ti2v" in variant else reference[method][:2]
        for rank, result in enumerate(ranks):
            if variant not in result:
                continue
            latents, record = result[variant]
            torch.testing.assert_close(latents, single, atol=ATOL, rtol=0, msg=f"{variant} rank {rank}")
            for branch, entry in record["branches"].items():  # CFG-parallel: one branch per rank
                reference_entry = single_record["branches"][branch]
                assert (entry["computed"], entry["skipped"]) == (reference_entry["computed"],
                                                                 reference_entry["skipped"]), (variant, rank)
                if method == "calibration":  # the norm ratios are means over all tokens, not over a slice
                    for step, ratio in entry["calibration"].items():
                        assert abs(ratio - reference_entry["calibration"][step]) < 1e-5, (variant, step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiling on the CPU takes ~50 s)")
def test_compiled_blocks_skip_the_same_steps():
    """model.compile: the compiled blocks called one by one (block 0, then the rest) decide as eager ones."""
    skipping = ["cache.method=first_block", *SKIPPING["first_block"]]
    eager, eager_record, settings = _denoise(skipping, device="cuda")
    compiled, record, _ = _denoise([*skipping, "model.compile=true"], device="cuda")
    assert _margin(eager_record, settings.threshold) > 1e-3  # GPU kernels differ from the CPU's in the last bits
    for name, branch in record["branches"].items():
        assert branch["skipped"] == eager_record["branches"][name]["skipped"], name
    assert len(record["branches"]["cond"]["skipped"]) >= 3
    # Inductor fuses elementwise work and may reorder fp32 reductions (a few ulps per op, as in
    # test_wan_compile.py); 12 guided steps amplify that to ~1e-5, far below a changed decision's O(0.01)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_summary_says_when_ranks_disagree():
    settings = resolve_cache(_cfg("cache.method=first_block"), "wan2.1-t2v", 96)
    a = {"branches": {"cond": {"computed": [0, 1, 3], "skipped": [2], "metric": {}}}, "expert_switches": []}
    b = {"branches": {"cond": {"computed": [0, 1, 2, 3], "skipped": [], "metric": {}}}, "expert_switches": []}
    assert cache_summary(settings, [a, a], _cfg(), {})["ranks_agree"]
    assert not cache_summary(settings, [a, b], _cfg(), {})["ranks_agree"]


def test_two_experts_start_afresh_at_the_switch():
    """The first step of the low-noise expert computes (its residual would be the other expert's)."""
    models = [randomize_(WanModel(WanConfig.tiny()).eval(), seed) for seed in (0, 1)]
    experts = Experts(models, [5.0, 5.0], boundary_timestep=500.0)
    _, record, _ = _denoise(["cache.method=first_block", "cache.threshold=10"], experts=experts)
    switch = record["expert_switches"]
    assert experts.num_switches == 1 and len(switch) == 1
    for branch in record["branches"].values():
        assert branch["computed"] == [0, switch[0], STEPS - 1], record  # threshold 10: skip wherever allowed


@pytest.mark.parametrize("overrides, kind, dim, message", [
    (["cache.method=first_block", "cache.threshold=-0.1"], "wan2.1-t2v", 96, "must be a number >= 0"),
    (["cache.method=teacache"], "wan2.2-t2v-a14b", 5120,
     "published coefficients for wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p only"),
    (["cache.method=magcache"], "wan2.2-ti2v-5b", 3072, "measure them once with cache.calibrate=true"),
    (["cache.method=first_block", "sample.steps=4", "sample.scheduler=euler", "sample.timesteps=[1000,750,500,250]",
      "sample.guidance_scale=1.0"], "wan2.1-t2v", 5120, "with a 4-step schedule"),
    (["cache.method=first_block", "cache.start_steps=6", "cache.end_steps=6"], "wan2.1-t2v", 96, "nothing could be"),
    (["cache.calibrate=true"], "wan2.1-t2v", 96, "set cache.method=magcache as well"),
], ids=["negative-threshold", "teacache-wan22", "magcache-ti2v", "distilled-4-steps", "all-forced", "calibrate-none"])
def test_bad_settings_are_refused(overrides, kind, dim, message):
    with pytest.raises(ValueError, match=message):
        resolve_cache(_cfg(*overrides), kind, dim)


def test_published_values_are_picked_by_model(tmp_path, ratios_file):
    t2v = resolve_cache(_cfg("cache.method=teacache", "sample.steps=50"), "wan2.1-t2v", 1536)
    assert (t2v.model, t2v.threshold, t2v.coefficients[0], t2v.start_steps, t2v.end_steps) == \
        ("wan2.1-t2v-1.3b", 0.08, 2.39676752e+03, 1, 1)
    ret = resolve_cache(_cfg("cache.method=teacache", "cache.teacache_ret_steps=true"), "wan2.1-t2v", 5120)
    assert (ret.model, ret.teacache_input, ret.start_steps, ret.end_steps) == ("wan2.1-t2v-14b", "e0", 5, 0)
    i2v = resolve_cache(_cfg("cache.method=magcache", "sample.steps=20", "sample.height=720", "sample.width=1280"),
                        "wan2.1-i2v", 5120, "/models/Wan2.1-I2V-14B-480P-Diffusers")
    assert i2v.model == "wan2.1-i2v-14b-480p"  # the checkpoint's name wins over the video's size
    assert len(i2v.ratios["cond"]) == 20 and "interpolated to 20" in i2v.source
    assert (i2v.threshold, i2v.max_skips, i2v.start_steps) == (0.24, 6, 4)
    assert resolve_cache(_cfg("cache.method=magcache", "sample.height=720", "sample.width=1280"), "wan2.1-i2v",
                         5120).model == "wan2.1-i2v-14b-720p"
    path = ratios_file[0]
    with pytest.raises(ValueError, match="was measured for 12 steps; this run has sample.steps=20"):
        resolve_cache(_cfg("cache.method=magcache", f"cache.ratios={path}", "sample.steps=20"), "wan2.1-t2v", 96)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": STEPS, "cond": [1.0] * 5, "uncond": [1.0] * STEPS}))
    with pytest.raises(ValueError, match="'cond' holds 5 ratios but the file says steps=12"):
        resolve_cache(_cfg("cache.method=magcache", f"cache.ratios={bad}"), "wan2.1-t2v", 96)
    other = tmp_path / "notes.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="exists and is not a ratios file lightx2v_sp wrote"):
        resolve_cache(_cfg("cache.method=magcache", "cache.calibrate=true", f"cache.ratios={other}"), "wan2.1-t2v", 96)


def test_calibrate_then_cache_end_to_end(tmp_path, capsys):
    """run(): a calibration run writes the ratios file; a second run reads it, skips, and says so in its
    summary and on the progress bar. A bad cache setting stops the run before anything loads."""
    tiny.ensure_tiny_model()
    ratios = tmp_path / "tiny_ratios.json"
    base = [f"sample.steps={STEPS}", "cache.method=magcache"]
    first = run(load_config(CONFIG, [*base, "cache.calibrate=true", f"cache.ratios={ratios}",
                                     f"output.path={tmp_path}/a.mp4"]), torch.device("cpu"), progress=False)
    assert first.summary["cache"]["ratios_written"] == str(ratios) and ratios.is_file()
    assert first.summary["cache"]["forwards_skipped"] == 0
    run(load_config(CONFIG, [*base, f"cache.ratios={ratios}", "cache.threshold=0.5",
                             f"output.path={tmp_path}/b.mp4"]), torch.device("cpu"), progress=True)
    with open(tmp_path / "b.json") as f:
        summary = json.load(f)["cache"]
    skipped = summary["forwards_skipped"]
    assert skipped > 0 and summary["forwards_computed"] + skipped == 2 * STEPS and summary["ranks_agree"]
    assert summary["source"] == str(ratios) and set(summary["branches"]) == {"cond", "uncond"}
    assert f"skipped {skipped}" in capsys.readouterr().err  # the progress bar's postfix
    with pytest.raises(AgreedError, match="cache.threshold = -1.0 must be a number >= 0"):
        run(load_config(CONFIG, [*base, "cache.threshold=-1", f"output.path={tmp_path}/c.mp4"]),
            torch.device("cpu"), progress=False)
    assert not os.path.exists(tmp_path / "c.mp4")
