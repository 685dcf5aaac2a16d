"""Offload on a real GPU: side-stream copies, events, pinned memory, peak memory.

Bit-identity (torch.equal) is required: the same kernels read the same weights, only from
another address; a race between the copy stream and the compute would show up as a mismatch.
"""
import copy

import pytest
import torch

from lightx2v_sp.offload import (CudaTransport, PinnedHostBuffer, StageMemory, enable_block_offload,
                                 offload_dit_blocks, place_component)
from helpers import ToyModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda")


def test_pinned_host_buffer_is_pinned_and_exact():
    buf = PinnedHostBuffer(3 * 2**20 + 5)
    assert buf.tensor.numel() == 3 * 2**20 + 5 and buf.tensor.is_pinned()
    del buf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_offload_bit_identical_on_cuda(dtype):
    torch.manual_seed(0)
    ref = ToyModel(6, dtype).eval().to(DEV)
    model = copy.deepcopy(ref)
    handle = enable_block_offload(model.blocks, DEV)
    assert handle.active and isinstance(handle.transport, CudaTransport)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.blocks.parameters())
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.inference_mode():
        for _ in range(5):  # later forwards exercise the wrap-around prefetch
            x = torch.randn(4, 512, 16, device=DEV, generator=g, dtype=dtype)
            assert torch.equal(model(x), ref(x))
    assert handle.stats()["block_copies"] == 5 * 6 + 1
    handle.remove()
    assert all(p.device.type == "cuda" for p in model.blocks.parameters())


def test_block_offload_lowers_peak_memory():
    torch.manual_seed(0)
    model = ToyModel(1, torch.float32)
    model.blocks = torch.nn.ModuleList(type(model.blocks[0])(1024) for _ in range(8))
    model.embed, model.head = torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)
    model = model.eval().to(DEV)
    x = torch.randn(2, 64, 1024, device=DEV)
    mem = StageMemory(DEV)
    with torch.no_grad(), mem.stage("resident"):
        ref = model(x)
    handle = offload_dit_blocks(model, DEV)
    torch.cuda.empty_cache()
    with torch.no_grad(), mem.stage("offload"):
        out = model(x)
    assert torch.equal(out, ref)
    block = handle.stats()["block_bytes"]
    peaks = mem.as_dict()
    # Resident holds 8 blocks, offload at most 2 buffers: the difference is at least 6 blocks minus
    # allocator slack, which is far smaller than one 16 MiB block.
    assert peaks["resident"]["allocated_bytes"] - peaks["offload"]["allocated_bytes"] > 5 * block


def test_swap_placement_on_cuda():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    ref = copy.deepcopy(m).to(DEV)
    placement = place_component(m, "swap", DEV, name="vae")
    assert placement.swaps and all(p.is_pinned() for p in m.parameters())
    x = torch.randn(3, 64, device=DEV)
    with torch.no_grad(), placement.on_device() as mod:
        assert all(p.device.type == "cuda" for p in mod.parameters())
        out = mod(x)
    assert torch.equal(out, ref(x))
    assert all(p.device.type == "cpu" for p in m.parameters())


def test_wan_block_offload_on_cuda():
    wan = pytest.importorskip("lightx2v_sp.models.wan")
    cfg = wan.WanConfig(dim=256, num_heads=4, num_layers=4, ffn_dim=512, text_dim=64, freq_dim=32)
    torch.manual_seed(0)
    ref = wan.WanModel(cfg).to(DEV).set_dtype(torch.bfloat16).eval()
    model = copy.deepcopy(ref)
    handle = offload_dit_blocks(model, DEV)
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(1, 16, 3, 16, 16, device=DEV, generator=g)
    t = torch.tensor([300.0], device=DEV)
    ctx = torch.randn(1, 24, 64, device=DEV, generator=g)
    with torch.no_grad():
        expected = ref(x, t, ctx)
        for _ in range(3):
            assert torch.equal(model(x, t, ctx), expected)
    assert handle.active


def test_first_copy_into_reused_memory_waits_for_queued_compute():
    """A buffer handed out by the caching allocator may be memory whose last kernels are still queued:
    here a fill of the freed tensor runs after a long sleep on the compute stream. A copy (no `after`
    event) that does not wait for the compute stream lands first and is then overwritten by the fill."""
    transport = CudaTransport(DEV)
    nbytes = 8 << 20
    host = transport.host_empty(nbytes)
    host.fill_(2)
    old = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    ptr = old.data_ptr()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of compute still queued when the copy is issued
    old.fill_(1)
    del old  # back to the allocator while its fill is still queued
    dst = transport.device_empty(nbytes)
    if dst.data_ptr() != ptr:
        pytest.skip("the caching allocator did not hand the same block back")
    transport.wait(transport.copy_async(dst, host))
    torch.cuda.synchronize()
    assert (dst == 2).all(), "the copy ran before the compute that still used the memory"


def test_close_frees_the_pinned_host_copy():
    """After the last denoise step (Experts.release -> close) the pinned host blocks are unregistered and
    freed, and the blocks can no longer run (instead of reading freed memory)."""
    import weakref

    model = ToyModel(4).eval().to(DEV)
    handle = enable_block_offload(model.blocks, DEV)
    pinned = [weakref.ref(b) for b in handle.transport._keepalive]
    assert len(pinned) == 4
    x = torch.randn(2, 8, 16, device=DEV)
    with torch.inference_mode():
        model(x)
    handle.close()
    assert handle.transport._keepalive == [] and all(ref() is None for ref in pinned)
    assert all(len(b._forward_pre_hooks) == 0 for b in model.blocks)
    # emptied tensors: a shape error (IndexError from unbind on this toy block, RuntimeError elsewhere)
    with torch.inference_mode(), pytest.raises((RuntimeError, IndexError)):
        model(x)
