"""DiT block offload on CPU: the real scheduler with injected transports.

The outputs must be bit-identical (torch.equal) to the resident blocks: offload changes where
the weights sit, never the arithmetic, so no tolerance is acceptable.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from lightx2v_sp.offload import (BlockOffload, HostTransport, InactiveBlockOffload, enable_block_offload,
                                 offload_dit_blocks)
from lightx2v_sp.offload.recording import RecordingTransport, check_schedule
from lightx2v_sp.offload.transport import _reset_no_effect_warning

from helpers import DIM, ToyBlock, ToyModel  # noqa: F401

def make(num_blocks, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = ToyModel(num_blocks, dtype).eval()
    return model, copy.deepcopy(model)


def inputs(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    return [torch.randn(2, 5, DIM, generator=g).to(dtype) for _ in range(n)]


def host_ptrs(offload: BlockOffload):
    return [flat.data_ptr() for flat in offload._host_flat]


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_bit_identical_to_resident(num_blocks, dtype, grad_mode):
    model, ref = make(num_blocks, dtype)
    ctx = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    xs = inputs(3, dtype)
    with ctx():
        expected = [ref(x) for x in xs]
    transport = RecordingTransport()  # deferred copies: a missing wait would read NaN poison
    handle = enable_block_offload(model.blocks, "cpu", transport=transport)
    with ctx():
        got = [model(x) for x in xs]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert handle.active and len(transport.device_buffers) == 2


def test_schedule_order_and_counts():
    num_blocks = 4
    model, _ = make(num_blocks)
    transport = RecordingTransport()
    handle = enable_block_offload(model.blocks, "cpu", transport=transport)
    transport.watch(model.blocks)
    with torch.no_grad():
        for x in inputs(2):
            model(x)
    copied = check_schedule(transport, host_ptrs(handle))
    # Two forwards: each block exactly once per forward, in order, plus the wrap-around
    # prefetch of block 0 for the next forward.
    assert copied == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert handle.stats()["block_copies"] == 9
    assert [e[0] for e in transport.log].count("alloc") == 2
    computes = [e[1] for e in transport.log if e[0] == "compute"]
    assert computes == [0, 1, 2, 3] * 2


def test_without_wraparound_each_forward_starts_cold():
    model, _ = make(3)
    transport = RecordingTransport()
    handle = enable_block_offload(model.blocks, "cpu", transport=transport, wraparound=False)
    transport.watch(model.blocks)
    with torch.no_grad():
        for x in inputs(2):
            model(x)
    assert check_schedule(transport, host_ptrs(handle)) == [0, 1, 2] * 2


def test_checker_catches_a_copy_not_ordered_after_compute(monkeypatch):
    """The checker is not vacuous: drop the `after` event and it must complain."""
    model, _ = make(3)
    transport = RecordingTransport()
    handle = enable_block_offload(model.blocks, "cpu", transport=transport)
    transport.watch(model.blocks)
    real_copy = transport.copy_async
    monkeypatch.setattr(transport, "copy_async", lambda dst, src, after=None: real_copy(dst, src, None))
    with torch.no_grad():
        model(inputs(1)[0])
    with pytest.raises(AssertionError, match="not ordered after"):
        check_schedule(transport, host_ptrs(handle))


def test_deferred_transport_catches_a_missing_wait(monkeypatch):
    """The bit-identity check is not vacuous: without waits the blocks read poisoned buffers."""
    model, ref = make(3)
    x = inputs(1)[0]
    with torch.no_grad():
        expected = ref(x)
    transport = RecordingTransport()
    enable_block_offload(model.blocks, "cpu", transport=transport)
    monkeypatch.setattr(transport, "wait", lambda event: None)
    with torch.no_grad():
        got = model(x)
    assert not torch.equal(expected, got)


def test_out_of_order_and_single_block_calls():
    model, ref = make(4)
    x = inputs(1)[0]
    handle = enable_block_offload(model.blocks, "cpu", transport=RecordingTransport())
    with torch.no_grad():
        for order in ([2], [3, 0], [1, 1], [0, 2, 1, 3]):
            got, want = x, x
            for i in order:
                got, want = model.blocks[i](got), ref.blocks[i](want)
            assert torch.equal(got, want), order
        assert torch.equal(model(x), ref(x))
    assert handle.active


def test_failure_inside_a_block_leaves_a_usable_model():
    model, ref = make(3)
    transport = RecordingTransport()
    handle = enable_block_offload(model.blocks, "cpu", transport=transport)
    x = inputs(1)[0]
    model.blocks[1].fail = True
    with torch.no_grad(), pytest.raises(RuntimeError, match="planted"):
        model(x)
    # The failed block was rebound to its host copy by the always-called post hook.
    host = handle._host_flat[1]
    lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
    assert all(lo <= p.data_ptr() < hi for p in model.blocks[1].parameters())
    model.blocks[1].fail = False
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_release_buffers_and_remove_restore():
    model, ref = make(3)
    transport = RecordingTransport()
    handle = enable_block_offload(model.blocks, "cpu", transport=transport)
    x = inputs(1)[0]
    with torch.no_grad():
        model(x)
        handle.release_buffers()
        assert handle._dev_flat == [None, None]
        assert torch.equal(model(x), ref(x))  # buffers come back on the next forward
    assert len(transport.device_buffers) == 4
    handle.remove()
    assert not handle.active
    assert all(len(b._forward_pre_hooks) == 0 and len(b._forward_hooks) == 0 for b in model.blocks)
    copies = handle.stats()["block_copies"]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert handle.stats()["block_copies"] == copies  # hooks gone: nothing streams any more
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q) and p.device == q.device, name


def test_offload_dit_blocks_places_the_rest():
    model, ref = make(3)
    handle = offload_dit_blocks(model, "cpu", transport=HostTransport())
    assert isinstance(handle, BlockOffload)
    with torch.no_grad():
        for x in inputs(2):
            assert torch.equal(model(x), ref(x))
    with pytest.raises(ValueError, match="ModuleList"):
        offload_dit_blocks(model, "cpu", blocks_attr="head", transport=HostTransport())


def test_user_errors():
    with pytest.raises(ValueError, match="empty"):
        enable_block_offload(nn.ModuleList(), "cpu", transport=HostTransport())
    mixed = nn.ModuleList([ToyBlock(DIM), ToyBlock(2 * DIM)])
    with pytest.raises(ValueError, match="block 1 differs from block 0"):
        enable_block_offload(mixed, "cpu", transport=HostTransport())
    tied = nn.ModuleList([ToyBlock(DIM), ToyBlock(DIM)])
    tied[1].fc1.weight = tied[0].fc1.weight
    with pytest.raises(ValueError, match="shared by blocks 0 and 1"):
        enable_block_offload(tied, "cpu", transport=HostTransport())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_warns_once_and_changes_nothing():
    _reset_no_effect_warning()
    model, ref = make(2)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="offload.dit=block has no effect"):
        handle = offload_dit_blocks(model, "cpu")
    assert isinstance(handle, InactiveBlockOffload) and not handle.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        again = enable_block_offload(model.blocks, torch.device("cpu"))
    assert not again.active
    assert ptrs == [p.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        assert torch.equal(model(inputs(1)[0]), ref(inputs(1)[0]))
    handle.release_buffers(), handle.remove()


def _tiny_wan():
    wan = pytest.importorskip("lightx2v_sp.models.wan")
    config = wan.WanConfig(dim=48, num_heads=4, num_layers=3, ffn_dim=64, text_dim=32, freq_dim=16)
    torch.manual_seed(0)
    return wan.WanModel(config).eval()


def test_wan_blocks_bit_identical():
    model = _tiny_wan()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 7, 32, generator=g)
    transport = RecordingTransport()
    handle = offload_dit_blocks(model, "cpu", transport=transport)
    transport.watch(model.blocks)
    with torch.no_grad():
        expected = ref(x, t, ctx)
        for _ in range(2):
            assert torch.equal(model(x, t, ctx), expected)
    assert check_schedule(transport, host_ptrs(handle)) == [0, 1, 2] * 2 + [0]


def test_cuda_copy_without_event_waits_for_the_compute_stream(monkeypatch):
    """CudaTransport.copy_async(after=None) (first copies into fresh block buffers, the swap placement)
    must order the copy stream after the compute stream: the caching allocator may hand out memory that
    queued kernels still use. CUDA itself is faked (streams and events record what is asked of them)."""
    import contextlib

    from lightx2v_sp.offload import CudaTransport

    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            log.append(("wait_event", self.name, event))

        def wait_stream(self, other):
            log.append(("wait_stream", self.name, other.name))

    class Event:
        def record(self, stream):
            log.append(("record", stream.name))

    compute = Stream("compute")

    @contextlib.contextmanager
    def on(stream):
        log.append(("enter", stream.name))
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    transport = CudaTransport.__new__(CudaTransport)
    transport.device, transport.copy_stream = torch.device("cuda", 0), Stream("copy")
    src, dst = torch.arange(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    transport.copy_async(dst, src)
    assert log == [("wait_stream", "copy", "compute"), ("enter", "copy"), ("record", "copy")]
    assert torch.equal(dst, src)
    log.clear()
    transport.copy_async(dst, src, after="slot free")
    assert log == [("wait_event", "copy", "slot free"), ("enter", "copy"), ("record", "copy")]
