"""ulysses_attention against single-device SDPA on the whole sequence, on 1-4 gloo ranks."""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightx2v_sp.attention import ulysses_attention
from lightx2v_sp.distributed.comm_quant import dequantize, quantize
from lightx2v_sp.distributed.comm_stats import CommStats
from lightx2v_sp.testing import run_on_ranks

HEADS, DIM = 12, 16  # 12 heads split over 1, 2, 3 and 4 ranks
VARIANTS = list(itertools.product(["all_to_all", "round_robin"], [True, False]))


def reference(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def fp8_round_trip(x):
    return dequantize(quantize(x), x.dtype)


def make_qkv(batch, seq, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, HEADS, DIM, generator=g).to(dtype) for _ in range(3)]


def layouts(world):
    """(name, per-rank sizes): even, uneven (first ranks hold one more) and irregular, incl. an empty rank."""
    return [("even", [4] * world),
            ("uneven", [3] * (world - 1) + [2] if world > 1 else [5]),
            ("irregular", [1, 6, 0, 2][:world] if world > 1 else [7])]


def _parity_on_ranks(rank, world):
    group = dist.group.WORLD
    results = []
    for (name, sizes), batch, dtype, (a2a, fuse) in itertools.product(
            layouts(world), [1, 2], [torch.float32, torch.bfloat16], VARIANTS):
        q, k, v = make_qkv(batch, sum(sizes), dtype)
        off = sum(sizes[:rank])
        rows = slice(off, off + sizes[rank])
        ref = reference(q, k, v)[:, rows]
        out = ulysses_attention(q[:, rows], k[:, rows], v[:, rows], group=group, seq_sizes=sizes,
                                a2a=a2a, fuse_qkv=fuse)
        assert out.shape == ref.shape and out.dtype == dtype
        results.append(((name, batch, str(dtype), a2a, fuse), max_diff(out, ref)))
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_exact_parity_with_single_device(world):
    if world == 1:
        results = [_parity_single()]
    else:
        results = run_on_ranks(_parity_on_ranks, world, timeout=240)
    for per_rank in results:
        for case, err in per_rank:
            # Ulysses only moves data: fp32 differs from SDPA on the whole sequence by reduction order
            # alone (~1e-7); bf16 by at most one or two bf16 ulps of O(1) outputs (2^-8 each).
            tol = 1e-5 if "float32" in case[2] else 1.6e-2
            assert err <= tol, (case, err)


def _parity_single():
    out = []
    for batch, dtype in itertools.product([1, 2], [torch.float32, torch.bfloat16]):
        q, k, v = make_qkv(batch, 9, dtype)
        err = max_diff(ulysses_attention(q, k, v, group=None), reference(q, k, v))
        out.append((("single", batch, str(dtype), "none", True), err))
    return out


def _fp8_on_ranks(rank, world, sizes):
    group = dist.group.WORLD
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = make_qkv(2, sum(sizes), dtype, seed=1)
        off = sum(sizes[:rank])
        rows = slice(off, off + sizes[rank])
        exact = reference(q.float(), k.float(), v.float())
        # What FP8 Ulysses computes: rows of q, k, v and of the output each pass the codec once.
        emulated = fp8_round_trip(reference(fp8_round_trip(q), fp8_round_trip(k), fp8_round_trip(v)))
        for a2a, fuse in VARIANTS:
            o = ulysses_attention(q[:, rows], k[:, rows], v[:, rows], group=group, seq_sizes=sizes,
                                  a2a=a2a, fuse_qkv=fuse, comm_dtype="fp8")
            out.append(((a2a, fuse, str(dtype)), max_diff(o, emulated[:, rows]), max_diff(o, exact[:, rows])))
    return out


@pytest.mark.parametrize("world, sizes", [(2, [5, 4]), (3, [4, 1, 6]), (4, [3, 3, 2, 2])])
def test_fp8_matches_its_emulation_and_its_bound(world, sizes):
    for per_rank in run_on_ranks(_fp8_on_ranks, world, sizes, timeout=240):
        for case, err_emulated, err_exact in per_rank:
            # The wire adds nothing beyond the codec: equal to the emulation up to fp32 rounding
            # (a decoded value times an fp32 scale can round one ulp either way, then SDPA); in
            # bf16 up to one bf16 ulp of an O(1) output (2^-8) where such a difference tips a rounding.
            tol = 1e-5 if "float32" in case[2] else 8e-3
            assert err_emulated <= tol, (case, err_emulated)
            # Not a silent no-op: e4m3 (3 mantissa bits) must leave a visible error ...
            assert err_exact > 1e-3, (case, err_exact)
            # ... within the codec bound: each row is off by <= amax/16 per value; outputs are
            # convex combinations of v rows (|v| < 5 here), so errors stay well below 5/16 * 2.
            assert err_exact < 0.3, (case, err_exact)


def _wire_on_ranks(rank, world):
    group = dist.group.WORLD
    sizes = [3] * world
    sizes[0] += 1
    q, k, v = (torch.randn(1, sum(sizes), HEADS, 128, generator=torch.Generator().manual_seed(i)).bfloat16()
               for i in range(3))
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    out = {}
    for a2a, fuse, comm in itertools.product(["all_to_all", "round_robin"], [True, False], [None, "fp8"]):
        stats = CommStats()
        with stats.record():
            ulysses_attention(q[:, rows], k[:, rows], v[:, rows], group=group, seq_sizes=sizes,
                              a2a=a2a, fuse_qkv=fuse, comm_dtype=comm)
        out[(a2a, fuse, comm)] = (dict(stats.calls), stats.total_bytes)
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_calls_and_bytes_on_the_wire(world):
    rounds = world - 1  # even N: N - 1 rounds; odd N: N rounds with one idle, so N - 1 partners too
    for rank_stats in run_on_ranks(_wire_on_ranks, world, timeout=240):
        for (a2a, fuse, comm), (calls, nbytes) in rank_stats.items():
            per_direction = 1 if fuse else 3
            if a2a == "all_to_all":
                assert calls == {"all_to_all": per_direction + 1}, (a2a, fuse, comm, calls)
            else:
                assert calls == {"sendrecv": (per_direction + 1) * rounds}, (a2a, fuse, comm, calls)
            # every variant moves the same bytes as the fused all_to_all of its dtype
            assert nbytes == rank_stats[("all_to_all", True, comm)][1]
        for a2a, fuse in VARIANTS:
            bf16 = rank_stats[(a2a, fuse, None)][1]
            fp8 = rank_stats[(a2a, fuse, "fp8")][1]
            assert fp8 <= 0.52 * bf16 and fp8 == pytest.approx(bf16 * (128 + 4) / 256)


def _bad_heads(rank, world):
    q = torch.randn(1, 4, 4, 8)
    try:
        ulysses_attention(q, q, q, group=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return None


def test_heads_not_divisible_lists_working_layouts():
    for msg in run_on_ranks(_bad_heads, 3):
        assert msg is not None and "4 attention heads cannot be split over a Ulysses group of 3" in msg
        # no Ulysses degree > 1 splits 4 heads on 3 ranks; a ring of 3 does
        assert msg.endswith("layouts that work on 3 rank(s): cfg_degree=1 x ulysses_degree=1 x ring_degree=3")


def _bad_sizes(rank, world):
    q = torch.randn(1, 4, 4, 8)
    msgs = []
    for kwargs in [dict(seq_sizes=[4, 5, 1]), dict(a2a="ring"), dict(comm_dtype="int4")]:
        try:
            ulysses_attention(q, q, q, group=dist.group.WORLD, **kwargs)
        except ValueError as err:
            msgs.append(str(err))
    return msgs


def test_bad_arguments_fail_before_any_collective():
    for msgs in run_on_ranks(_bad_sizes, 2):
        assert "seq_sizes=[4, 5, 1] does not describe a group of 2" in msgs[0]
        assert "a2a='ring'" in msgs[1] and "comm_dtype='int4'" in msgs[2]


def _disagreeing(rank, world):
    q = torch.randn(1, 3, 4, 8)
    out = []
    # agreed sizes pass; then sizes that each rank's own entry satisfies (3 tokens) but the ranks
    # disagree on ([3, 4] vs [2, 3]), which only the agreement check can see
    for sizes in ([3, 3], [3, 4] if rank == 0 else [2, 3]):
        try:
            ulysses_attention(q, q, q, group=dist.group.WORLD, seq_sizes=sizes)
            out.append(None)
        except ValueError as err:
            out.append(str(err))
    try:
        x = q[:, :2].to(torch.float64 if rank else torch.float32)  # a layout neither rank has used
        ulysses_attention(x, x, x, group=dist.group.WORLD)
        out.append(None)
    except ValueError as err:
        out.append(str(err))
    try:
        from lightx2v_sp.distributed import gather_sequence
        gather_sequence(q, dim=1, group=dist.group.WORLD)
    except ValueError as err:
        out.append(str(err))
    return out


def test_ranks_that_disagree_get_an_error_not_a_hang():
    for rank, msgs in enumerate(run_on_ranks(_disagreeing, 2, timeout=60)):
        assert msgs[0] is None
        assert "disagree on the layout" in msgs[1]
        assert "disagree on the layout" in msgs[2] and "rank 0" in msgs[2] and "rank 1" in msgs[2]
        assert "needs sizes=" in msgs[3]
