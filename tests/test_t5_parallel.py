"""UMT5 tensor parallel (2 and 3 ranks) and data parallel on gloo vs transformers' UMT5EncoderModel.

The reference is the unsharded transformers encoder on the same weights, in the parent process,
with padding positions zeroed (the parallel layouts return Wan's context form).

Tolerance: fp32 everywhere. TP sums each projection's partial products over head / FFN-column
shards in another order than one matmul does, and DP/replicate skip trailing padding columns
(other matmul shapes); both change results by float rounding only, observed <= 2e-6 on outputs
of magnitude <= 4. 2e-5 is 10x that; a wrong head slice, bias shard or missing residual moves
outputs by O(0.1-1).
"""
from __future__ import annotations

import pytest
import torch

from lightx2v_sp.models.t5 import T5Config
from lightx2v_sp.models.t5.budget import comm_bytes, weight_numel
from lightx2v_sp.testing import run_on_ranks

ATOL = 2e-5
# 6 heads split over 2 and 3 ranks; d_ff=50 splits unevenly over 3 (17, 17, 16), vocab too
TINY = dict(vocab_size=100, d_model=48, d_kv=8, num_heads=6, d_ff=50, num_layers=2)
CFG = T5Config(**TINY)
CASES = {  # name -> (batch, padded length, real lengths or None for no mask)
    "three_prompts": (3, 20, [13, 5, 9]),   # 39 tokens after trimming: 20+19 on 2 ranks
    "two_prompts": (2, 20, [13, 9]),        # 26 tokens: 9+9+8 on 3 ranks
    "no_mask": (1, 7, None),                # 7 tokens: 4+3 / 3+2+2; one prompt leaves dp ranks idle
}


def case_inputs(name):
    batch, length, lengths = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    ids = torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)
    if lengths is None:
        return ids, None
    return ids, (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(**TINY, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                        attn_implementation="eager")).eval()
    with torch.no_grad():  # a large bias so that a wrong per-head slice of it shows
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("umt5")
    model.save_pretrained(path)
    refs = {}
    for name in CASES:
        ids, mask = case_inputs(name)
        mask = torch.ones_like(ids) if mask is None else mask
        with torch.no_grad():
            refs[name] = model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    return str(path), refs


def _ranks(rank: int, world: int, path: str):
    from lightx2v_sp.distributed import ParallelDims
    from lightx2v_sp.distributed.comm_stats import CommStats
    from lightx2v_sp.models.t5 import T5Encoder, load_parallel_t5, parallelize, parallelize_t5

    dims = ParallelDims(ulysses_degree=world)
    gathered_shapes = []
    real_all_gather_v = parallelize.all_gather_v

    def spy(x, dim, sizes, group, symmetric=False):
        out = real_all_gather_v(x, dim, sizes, group, symmetric)
        gathered_shapes.append(tuple(out.shape))
        return out

    # tp: each rank reads only its slices from the checkpoint
    tp = load_parallel_t5(path, dims, "tp")
    assert tp.shard is not None and tp.shard.rank == rank
    # tp: a full encoder cut down in place
    tp_cut = parallelize_t5(T5Encoder.from_pretrained(path), dims, "tp")
    dp = parallelize_t5(T5Encoder.from_pretrained(path), dims, "dp")
    result = {"tp": {}, "tp_cut": {}, "dp": {}, "stats": {}, "gathered": {},
              "block_params": sum(p.numel() for p in tp.blocks.parameters()),
              "all_params": sum(p.numel() for p in tp.parameters()),
              "cut_params": sum(p.numel() for p in tp_cut.parameters())}
    with torch.no_grad():
        for name in CASES:
            ids, mask = case_inputs(name)
            for mode, enc in (("tp", tp), ("dp", dp)):
                stats = CommStats()
                parallelize.all_gather_v = spy
                gathered_shapes.clear()
                with stats.record():
                    result[mode][name] = enc(ids, mask)
                parallelize.all_gather_v = real_all_gather_v
                result["stats"][(mode, name)] = stats.as_dict()
                result["gathered"][(mode, name)] = list(gathered_shapes)
            result["tp_cut"][name] = tp_cut(ids, mask)
    return result


def _check(world, checkpoint):
    path, refs = checkpoint
    results = run_on_ranks(_ranks, world, path)
    full = weight_numel(CFG)
    norms = 2 * CFG.d_model * CFG.num_layers
    assert sum(r["block_params"] - norms for r in results) == full["blocks"] - norms  # a partition
    for rank, res in enumerate(results):
        for name, (batch, length, lengths) in CASES.items():
            ref = refs[name]
            real = lengths or [length] * batch
            for mode in ("tp", "dp", "tp_cut"):
                out = res[mode][name]
                assert out.shape == ref.shape, (mode, name)
                assert (out - ref).abs().max() < ATOL, (mode, name, rank, (out - ref).abs().max())
                assert torch.equal(out, results[0][mode][name]), "every rank must hold the same result"
            assert torch.equal(res["tp"][name], res["tp_cut"][name])  # same slices either way
            if lengths is not None:
                assert res["dp"][name][-1, lengths[-1]:].abs().max() == 0  # zeros past the prompt
            # dp: one gather into exactly sum(real lengths) rows of d_model, no padding
            assert res["gathered"][("dp", name)] == [(sum(real), CFG.d_model)]
            for mode in ("tp", "dp"):
                want = comm_bytes(CFG, mode, real, world, rank, dtype_bytes=4)
                got = res["stats"][(mode, name)]
                assert {k: v for k, v in got["bytes"].items()} == want["bytes"], (mode, name, rank)
                assert got["calls"] == want["calls"], (mode, name, rank)
        # each rank holds 1/N of the block weights: everything but the RMS norm weights (2 x d_model a
        # block, replicated) is split, up to one FFN column (gate, fc1, fc2) per layer when d_ff % N
        assert res["block_params"] == weight_numel(CFG, "tp", world, rank)["blocks"]
        split = res["block_params"] - norms
        assert abs(split - (full["blocks"] - norms) / world) <= 3 * CFG.d_model * CFG.num_layers
        assert res["all_params"] == res["cut_params"] == weight_numel(CFG, "tp", world, rank)["total"]
    return results


def test_tp_and_dp_two_ranks(checkpoint):
    _check(2, checkpoint)


def test_tp_and_dp_three_ranks(checkpoint):
    _check(3, checkpoint)


def test_impossible_layouts_raise(checkpoint):
    from lightx2v_sp.models.t5 import T5Encoder, T5Shard, parallelize_t5

    path = checkpoint[0]
    with pytest.raises(ValueError, match=r"6 attention heads evenly.*TP size in \[1, 2, 3, 6\]"):
        T5Shard(0, 4).check(CFG)
    with pytest.raises(ValueError, match="'pipeline' is not one of"):
        parallelize_t5(T5Encoder.from_pretrained(path), None, "pipeline")
    # a shard loaded for 2 ranks cannot run in a 1-rank job, nor as dp
    with pytest.raises(ValueError, match=r"holds the tensor-parallel shard .* mode='dp'"):
        parallelize_t5(T5Encoder.from_pretrained(path, shard=T5Shard(1, 2)), None, "dp")


def _nccl_order(rank: int, world: int, path: str, mode: str):
    """The runner's order on a GPU job: load on the host, lay out, then the placement moves it.

    Laying out must not look at where the weights are (the placement has not moved them yet); a
    forward on host weights through an NCCL group must be a clear error, not an NCCL crash. The
    group's backend is reported as nccl (gloo underneath), since this runs without GPUs.
    """
    import torch.distributed as dist

    from lightx2v_sp.distributed import ParallelDims
    from lightx2v_sp.models.t5 import load_parallel_t5

    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        enc = load_parallel_t5(path, ParallelDims(ulysses_degree=world), mode)  # used to raise here
    finally:
        dist.get_backend = real
    ids, mask = case_inputs("two_prompts")
    try:
        enc(ids, mask)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("mode", ["tp", "dp"])
def test_layout_before_placement_on_nccl(checkpoint, mode):
    for message in run_on_ranks(_nccl_order, 2, checkpoint[0], mode):
        assert message is not None and f"text_encoder.parallel={mode}" in message and "runs on cpu" in message


def _dp_in_cfg_job(rank: int, world: int, path: str):
    """cfg 2 x ulysses 1: the Ulysses group is None (this process), the encoder spans the job."""
    from lightx2v_sp.distributed import ParallelDims
    from lightx2v_sp.models.t5 import load_parallel_t5

    dims = ParallelDims(ulysses_degree=1, cfg_degree=2)
    enc = load_parallel_t5(path, dims, "dp")
    ids, mask = case_inputs("three_prompts")
    with torch.no_grad():
        return dims.sp_group is None, enc.parallel_forward.size, enc(ids, mask)


def test_dp_gather_in_a_cfg_parallel_job(checkpoint):
    path, refs = checkpoint
    for sp_none, size, out in run_on_ranks(_dp_in_cfg_job, 2, path):
        assert sp_none and size == 2  # split over both ranks of the job, not over the (absent) sp group
        assert (out - refs["three_prompts"]).abs().max() < ATOL
