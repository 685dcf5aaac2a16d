"""Ring attention and Ulysses x ring (USP) against one process: the LSE kernels, the block merge,
the layout checks, the attention on 4 and 6 gloo ranks (every layout of those sizes that differs:
ring 4, ulysses 2 x ring 2, cfg 2 x ring 2; ulysses 2 x ring 3, ulysses 3 x ring 2, cfg 2 x ring 3)
with even, uneven and empty slices, both dtypes, fp8 on the wire and the Ulysses variants, and the
whole tiny pipeline on 4 ranks (T2V ulysses 2 x ring 2; the two-expert I2V model at cfg 2 x ring 2).
One spawn per world size runs everything of that size (spawning is the slow part).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightx2v_sp.attention import backends
from lightx2v_sp.attention.lse import math_lse
from lightx2v_sp.attention.ring_merge import merge_partials, merge_torch, merge_weights
from lightx2v_sp.config import load_config
from lightx2v_sp.distributed import ParallelDims, check_layout, resolve_ulysses_degree
from lightx2v_sp.distributed.comm_quant import dequantize, quantize
from lightx2v_sp.distributed.comm_stats import CommStats
from lightx2v_sp.distributed.mesh import group_ranks
from lightx2v_sp.models import tiny
from lightx2v_sp.pipeline import run
from lightx2v_sp.testing import run_on_ranks

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# name -> (config, overrides): one layout per model kind the ring must compose with
PIPELINES = {
    "t2v_uly2_ring2": ("wan_t2v_tiny.yaml", ["sample.steps=2", "parallel.ulysses_degree=2", "parallel.ring_degree=2",
                                              "parallel.a2a=round_robin"]),
    # 2 steps at shift 5: t = 999 (high-noise expert), then 833 < the 900 boundary (low-noise expert)
    "i2v_experts_cfg2_ring2": ("wan22_i2v_tiny.yaml", ["sample.steps=2", "parallel.cfg_degree=2",
                                                       "parallel.ring_degree=2"]),
}
# The pipelines' tolerance, as test_pipeline_layouts.py argues it: fp32 math reordered (here also by the
# LSE merge), amplified by guidance and the VAE to at most ~1e-5; a wrong block, weight or rank moves
# values by O(0.1-1).
PIPELINE_ATOL = 1e-4

D = 16


def _qkv(batch, seq, heads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, D, generator=g).to(dtype) for _ in range(3)]


def _exact(q, k, v):
    return F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _rt(x):
    return dequantize(quantize(x), x.dtype)


def _diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --- one process ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lse_kernels_match_math(dtype):
    q, k, v = _qkv(2, 37, 3, dtype, 0)
    want = _exact(q, k, v)
    qd, kd = q.double().transpose(1, 2), k.double().transpose(1, 2)
    want_lse = torch.logsumexp(qd @ kd.transpose(-1, -2) / D ** 0.5, dim=-1)
    checked = []
    for name in backends.available_backends():
        info = backends.kernel_info(name)
        if info.lse is None or not info.supports(q.device, dtype, D):
            continue
        out, lse = info.lse(q, k, v)
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, 3, 37) and lse.dtype == torch.float32
        # fp32: reduction order only (~1e-7 on O(1) values); bf16 operands, fp32 accumulation: the
        # output rounds to bf16 (2^-8 relative), the lse stays fp32 (~1e-6 from the bf16 inputs' products)
        assert _diff(out, want) <= (1e-5 if dtype == torch.float32 else 1.6e-2), name
        assert _diff(lse, want_lse) <= (1e-5 if dtype == torch.float32 else 1e-4), name
        checked.append(name)
    assert {"sdpa", "sdpa_math"} <= set(checked)


def test_merge_of_blocks_is_attention_over_all_keys():
    q, k, v = _qkv(2, 9, 3, torch.float32, 1)
    k[:, 5:] *= 3  # blocks with very different score scales: a wrong weighting shows
    edges = [0, 7, 8, 13, 20]
    k, v = (torch.cat([t, t[:, :11]], 1) for t in (k, v))
    parts, lses = zip(*(math_lse(q, k[:, a:b], v[:, a:b]) for a, b in zip(edges, edges[1:])))
    whole = _exact(q, k[:, :20], v[:, :20])
    merged = merge_partials(list(parts), list(lses), torch.float32)
    assert _diff(merged, whole) < 1e-6  # fp32 weights and accumulation: a few ulps of O(1) values
    # the weights are the whole point: a plain mean of the blocks is far off
    assert _diff(sum(parts) / len(parts), whole) > 0.1
    # bf16 partials, fp32 merge: within one bf16 rounding of the output
    bf = merge_torch([p.bfloat16() for p in parts], merge_weights(list(lses)), torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and _diff(bf, whole) < 1.6e-2
    with pytest.raises(ValueError, match="needs CUDA"):
        merge_partials(list(parts), list(lses), torch.float32, impl="triton")


def test_layouts_that_fit_and_those_that_do_not():
    # 12 heads on 24 ranks: Ulysses stops at 12, the ring takes the factor 2
    check_layout(24, 12, 1, 12, ring_degree=2)
    assert resolve_ulysses_degree(24, 0, 1, 2) == 12 and resolve_ulysses_degree(24, 0, 2, 3) == 4
    with pytest.raises(ValueError, match="cannot be split over a Ulysses group of 24") as err:
        check_layout(24, 24, 1, 12)
    assert str(err.value).endswith("cfg_degree=2 x ulysses_degree=12, cfg_degree=1 x ulysses_degree=12 x ring_degree=2")
    with pytest.raises(ValueError, match=r"ulysses_degree x cfg_degree x ring_degree = 4 x 1 x 4 = 16 but the world "
                                         r"size is 24.*cfg_degree=1 x ulysses_degree=12 x ring_degree=2"):
        check_layout(24, 4, 1, 12, ring_degree=4)
    with pytest.raises(ValueError, match="parallel.ring_degree must be a positive integer, got 0"):
        check_layout(2, 2, 1, ring_degree=0)
    with pytest.raises(ValueError, match="'parallel.ring_degree' = 0 must be >= 1"):
        load_config(None, ["parallel.ring_degree=0"])
    # ranks = (cfg * ring + ring_rank) * ulysses + ulysses_rank: Ulysses contiguous, ring across
    g = group_ranks(cfg_degree=2, ring_degree=2, ulysses_degree=4)
    assert g["ulysses"][:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert g["ring"][:2] == [[0, 4], [1, 5]] and g["ring"][4] == [8, 12]
    assert g["sequence"] == [list(range(8)), list(range(8, 16))] and g["cfg"][5] == [5, 13]
    for axis in g.values():  # every rank in exactly one group of each axis
        assert sorted(r for ranks in axis for r in ranks) == list(range(16))


def test_memory_plan_counts_the_ring():
    from lightx2v_sp.plan import make_plan

    def denoise(*overrides):  # the tiny DiT (12 heads of 8) at 480p, 81 frames: 32760 tokens, on 4 ranks
        cfg = load_config(None, ["model.dtype=bf16", "parallel.ulysses_degree=2", *overrides])
        return make_plan(cfg, 4)[1][0].stages[1].gpu

    ring = denoise("parallel.ring_degree=2")  # 8190 tokens per rank, 16380 per Ulysses group, 6 heads
    cfg2 = denoise("parallel.cfg_degree=2")  # ulysses 2 alone: 16380 tokens per rank
    assert ring["DiT activations"] * 2 == cfg2["DiT activations"] and "ring attention buffers" not in cfg2
    chunk, d, bf16 = 16380 * 6, 8, 2  # tokens x heads of one Ulysses group on one rank; head dim
    wire, partials, merged = 2 * 2 * chunk * d * bf16, 2 * chunk * (d * bf16 + 8), chunk * d * bf16
    assert ring["ring attention buffers"] == wire + partials + merged
    fp8 = denoise("parallel.ring_degree=2", "parallel.comm_dtype=fp8")["ring attention buffers"]
    assert fp8 == 2 * 2 * chunk * (d + 4) + 2 * chunk * d * bf16 + partials + merged  # + the decoded block


def test_ring_needs_a_kernel_with_its_lse():
    backends.register_backend("no_lse", backends._sdpa)
    try:
        with pytest.raises(ValueError, match="'no_lse' does not return its log-sum-exp.*ring_degree > 1"):
            backends.resolve_backend("no_lse", "cpu", torch.float32, need_lse=True)
        assert backends.resolve_backend("no_lse", "cpu", torch.float32) == "no_lse"
        assert backends.resolve_backend("auto", "cpu", torch.float32, need_lse=True) == "sdpa"
    finally:
        backends.unregister_backend("no_lse")


# --- several ranks -------------------------------------------------------------------------------

def _size_patterns(p):
    """Per-rank token counts over a sequence group of p: even, uneven, and one with an empty rank."""
    return [[4] * p, [3] * (p - 1) + [5], [2, 0] + [3 + i for i in range(p - 2)]]


def _cases(p, uly):
    """(sizes, batch, dtype, comm_dtype, (a2a, fuse_qkv)): every size pattern in fp32, then bf16, fp8 on
    the wire and the other Ulysses variant once each (the spawn, not the cases, is the slow part)."""
    even, uneven, empty = _size_patterns(p)
    plain = ("all_to_all", True)
    out = [(sizes, 2, torch.float32, None, plain) for sizes in (even, uneven, empty)]
    out += [(uneven, 1, torch.bfloat16, None, plain), (empty, 2, torch.float32, "fp8", plain)]
    if uly > 1:
        out.append((uneven, 1, torch.float32, None, ("round_robin", False)))
    return out


def _run_layout(rank, uly, ring, cfg, heads):
    from lightx2v_sp.attention.options import UlyssesOptions
    from lightx2v_sp.attention.ring import usp_attention

    dims = ParallelDims(ulysses_degree=uly, cfg_degree=cfg, ring_degree=ring)
    rows = []
    for sizes, batch, dtype, comm, (a2a, fuse) in _cases(uly * ring, uly):
        # the two CFG branches attend over different data: a ring that crossed them would show
        q, k, v = _qkv(batch, sum(sizes), heads, dtype, seed=10 * dims.cfg_rank + len(rows))
        off = sum(sizes[:dims.sp_rank])
        mine = slice(off, off + sizes[dims.sp_rank])
        stats = CommStats()
        with stats.record():
            out = usp_attention(q[:, mine], k[:, mine], v[:, mine], dims.ulysses_group, dims.ring_group, sizes,
                                UlyssesOptions(a2a=a2a, fuse_qkv=fuse, comm_dtype=comm))
        assert out.shape == q[:, mine].shape and out.dtype == dtype
        if comm == "fp8":  # what the wire does: q and the output pass the codec in Ulysses, k and v once
            qe = _rt(q) if uly > 1 else q
            want = _exact(qe, _rt(k), _rt(v))
            want = _rt(want.float()) if uly > 1 else want
        else:
            want = _exact(q, k, v)
        rows.append({"case": (uly, ring, cfg, tuple(sizes), batch, str(dtype), comm, a2a, fuse),
                     "err": _diff(out, want[:, mine]), "err_exact": _diff(out, _exact(q, k, v)[:, mine]),
                     "ring_calls": stats.calls.get("ring_sendrecv", 0),
                     "ring_bytes": stats.bytes.get("ring_sendrecv", 0),
                     "sizes": sizes, "sp_rank": dims.sp_rank, "ring_rank": dims.ring_rank,
                     "shape": (batch, heads // uly)})
    groups = {name: dist.get_process_group_ranks(g) if g is not None else [dims.rank]
              for name, g in (("ulysses", dims.ulysses_group), ("ring", dims.ring_group), ("sp", dims.sp_group),
                              ("cfg", dims.cfg_group))}
    return rows, groups


def _compiled_ring(rank, ring):
    from lightx2v_sp.attention.ring import ring_attention

    dims = ParallelDims(ring_degree=ring)
    q, k, v = _qkv(1, 5 * ring, 2, torch.float32, 3)
    mine = slice(5 * rank, 5 * rank + 5)

    def f(q, k, v):
        return ring_attention(q, k, v, dims.ring_group) * 2 + 1

    compiled = torch.compile(f, backend="eager")  # dynamo breaks the graph around the ring, never traces it
    return _diff(compiled(q[:, mine], k[:, mine], v[:, mine]), _exact(q, k, v)[:, mine] * 2 + 1)


def _pipeline_cfg(cache, outdir, name, *extra):
    os.environ["LIGHTX2V_SP_CACHE"] = cache
    config, overrides = PIPELINES[name]
    return load_config(os.path.join(CONFIGS, config), [*overrides, f"output.path={outdir}/{name}.mp4", "device=cpu",
                                                       *extra])


def _on_four(rank, world, cache, outdir):
    out = {name: run(_pipeline_cfg(cache, outdir, name), torch.device("cpu"), progress=False, keep_video=True)
           for name in PIPELINES}
    out.update({layout: _run_layout(rank, *layout, heads=4) for layout in ((1, 4, 1), (2, 2, 1), (1, 2, 2))})
    # 2 heads on 4 ranks (the shape of 12 heads on 24): Ulysses 4 cannot split them, 2 x ring 2 can
    errors = []
    for uly, ring in ((4, 1), (2, 2)):
        try:
            ParallelDims(ulysses_degree=uly, ring_degree=ring).check_heads(2)
        except ValueError as e:
            errors.append(str(e))
    out["two_heads"] = (_run_layout(rank, 2, 2, 1, heads=2)[0], errors)
    out["compiled"] = _compiled_ring(rank, 4)
    return out


def _on_six(rank, world):
    return {layout: _run_layout(rank, *layout, heads=6) for layout in ((2, 3, 1), (3, 2, 1), (1, 3, 2))}


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    for variant in ("wan2.1-t2v", "wan2.2-i2v-a14b"):
        tiny.ensure_tiny_model(cache, variant)  # built once here; the ranks find them complete
    outdir = str(tmp_path_factory.mktemp("out"))
    refs = {name: run(_pipeline_cfg(cache, outdir, name, "parallel.ulysses_degree=1", "parallel.cfg_degree=1",
                                    "parallel.ring_degree=1", f"output.path={outdir}/{name}_single.mp4"),
                      torch.device("cpu"), progress=False, keep_video=True) for name in PIPELINES}
    return refs, run_on_ranks(_on_four, 4, cache, outdir, timeout=400)


@pytest.fixture(scope="module")
def six():
    return run_on_ranks(_on_six, 6, timeout=300)


def _check_rows(rows):
    for row in rows:
        dtype, comm = row["case"][5:7]
        if comm == "fp8":
            # against its emulation: fp32 rounding only (a decoded value times its scale can round one
            # ulp either way); e4m3 must leave a visible error, within the codec's bound (amax / 16 a
            # value; outputs are convex combinations of v rows with |v| < 5)
            assert row["err"] <= 1e-5 and row["err_exact"] < 0.3, row
            assert row["err_exact"] > 1e-3 or not row["sizes"][row["sp_rank"]], row  # unless it holds no tokens
        else:
            # fp32: the LSE merge reorders sums (~1e-7 on O(1) outputs); bf16: one or two bf16 ulps (2^-8)
            assert row["err"] <= (1e-5 if "float32" in dtype else 1.6e-2), row


def _check_wire(rows):
    for row in rows:
        uly, ring, _, sizes, _, dtype, comm = row["case"][:7]
        chunks = [sum(sizes[g * uly:(g + 1) * uly]) for g in range(ring)]
        sent = [chunks[(row["ring_rank"] - t) % ring] for t in range(ring - 1)]  # blocks this rank passes on
        b, hp = row["shape"]
        item = {"torch.float32": 4, "torch.bfloat16": 2}[dtype]
        per_token = 2 * b * hp * ((D + 4) if comm == "fp8" else D * item)  # k and v rows
        assert row["ring_calls"] == sum(1 for s in sent if s), row
        assert row["ring_bytes"] == per_token * sum(sent), row


@pytest.mark.parametrize("layout", [(1, 4, 1), (2, 2, 1), (1, 2, 2)], ids=["ring4", "uly2xring2", "cfg2xring2"])
def test_four_ranks_match_one_process(four, layout):
    for per_rank in four[1]:
        rows, _ = per_rank[layout]
        _check_rows(rows)
        _check_wire(rows)


@pytest.mark.parametrize("layout", [(2, 3, 1), (3, 2, 1), (1, 3, 2)], ids=["uly2xring3", "uly3xring2", "cfg2xring3"])
def test_six_ranks_match_one_process(six, layout):
    for per_rank in six:
        rows, _ = per_rank[layout]
        _check_rows(rows)
        _check_wire(rows)


def test_groups_on_ranks(four, six):
    for rank, per_rank in enumerate(four[1]):
        pair = [rank // 2 * 2, rank // 2 * 2 + 1]
        assert per_rank[(2, 2, 1)][1] == {"ulysses": pair, "ring": [rank % 2, rank % 2 + 2], "sp": [0, 1, 2, 3],
                                          "cfg": [rank]}
        assert per_rank[(1, 2, 2)][1] == {"ulysses": [rank], "ring": pair, "sp": pair, "cfg": [rank % 2, rank % 2 + 2]}
    for rank, per_rank in enumerate(six):
        assert per_rank[(3, 2, 1)][1]["ring"] == [rank % 3, rank % 3 + 3]


def test_two_heads_on_four_ranks(four):
    for per_rank in four[1]:
        rows, errors = per_rank["two_heads"]
        _check_rows(rows)
        (too_wide,) = errors  # ulysses 2 x ring 2 was accepted
        assert "2 attention heads cannot be split over a Ulysses group of 4" in too_wide
        assert "cfg_degree=2 x ulysses_degree=2, cfg_degree=1 x ulysses_degree=2 x ring_degree=2" in too_wide


def test_ring_under_torch_compile(four):
    for per_rank in four[1]:
        assert per_rank["compiled"] < 1e-5


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_video_matches_one_process(four, name):
    refs, ranks = four
    ref = refs[name]
    for per_rank in ranks:  # every rank ends with the same latents
        torch.testing.assert_close(per_rank[name].latents, ref.latents, atol=PIPELINE_ATOL, rtol=0)
    assert all(per_rank[name].video is None for per_rank in ranks[1:])
    video = ranks[0][name].video
    assert ref.video.std() > 0.05  # not a constant video that would match anything
    torch.testing.assert_close(video, ref.video, atol=PIPELINE_ATOL, rtol=0)
    s = ranks[0][name].summary
    p = s["config"]["parallel"]
    assert (s["layout"]["ulysses_degree"], s["layout"]["cfg_degree"], s["layout"]["ring_degree"]) == \
        (p["ulysses_degree"] or 1, p["cfg_degree"], 2)
    assert len(s["vae"]["pixel_rows_per_rank"]) == 4 and all(s["vae"]["pixel_rows_per_rank"])  # split over the job
    layers = tiny.TINY_WAN["num_layers"]
    forwards = s["denoise"]["dit_forwards_per_rank"]
    # each self-attention passes its K/V block on once per step of a ring of 2, on every rank
    assert s["comm"]["total"]["calls"]["ring_sendrecv"] == sum(forwards) * layers
    if name.startswith("i2v"):
        assert s["experts"]["switches"] == 1  # both experts ran under the ring
