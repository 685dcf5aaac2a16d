"""Component placement (gpu / cpu / swap) and the peak-memory helpers, on CPU."""
import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from lightx2v_sp.offload import ComponentPlacement, StageMemory, gib, peak_memory_bytes, place_component
from lightx2v_sp.offload.recording import RecordingTransport
from lightx2v_sp.offload.transport import _reset_no_effect_warning


def make_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    m.register_buffer("offset", torch.randn(4))
    return m


def inside(t, flat):
    return flat.data_ptr() <= t.data_ptr() < flat.data_ptr() + flat.numel()


def test_invalid_mode_is_a_value_error():
    with pytest.raises(ValueError, match=r"'disk' is not one of \['gpu', 'cpu', 'swap'\]"):
        place_component(make_module(), "disk", "cpu", name="vae")


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_resident_modes_on_cpu(mode):
    m = make_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gpu/cpu on a CPU-only machine are not offload requests
        placement = place_component(m, mode, "cpu")
    assert placement.execution_device == torch.device("cpu") and not placement.swaps
    with placement.on_device() as mod:
        assert mod is m


def test_swap_moves_in_one_copy_and_rebinds_to_host():
    m = make_module()
    ref = copy.deepcopy(m)
    transport = RecordingTransport()
    placement = ComponentPlacement(m, "swap", "cpu", name="text_encoder", transport=transport)
    assert placement.swaps
    host = placement._host_flat
    assert all(inside(t, host) for t in list(m.parameters()) + list(m.buffers()))
    x = torch.randn(3, 8)
    with torch.no_grad(), placement.on_device() as mod:
        device_flat = transport.device_buffers[-1]
        assert all(inside(t, device_flat) for t in list(mod.parameters()) + list(mod.buffers()))
        with placement.on_device():  # nested stages do not copy again
            pass
        assert torch.equal(mod(x) + mod.offset, ref(x) + ref.offset)
    assert [e[0] for e in transport.log].count("copy") == 1
    assert all(inside(t, host) for t in list(m.parameters()) + list(m.buffers()))
    with torch.no_grad(), placement.on_device() as mod:  # a second stage copies again
        assert torch.equal(mod(x), ref(x))
    assert [e[0] for e in transport.log].count("copy") == 2


def test_swap_frees_the_device_copy_after_the_stage():
    m = make_module()
    transport = RecordingTransport()
    placement = ComponentPlacement(m, "swap", "cpu", transport=transport)
    with placement.on_device():
        pass
    buf = weakref.ref(transport.device_buffers.pop())  # drop the recorder's own reference
    gc.collect()
    assert buf() is None, "the placement still holds the device copy after its stage"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_swap_without_cuda_warns_once_and_runs_in_place():
    _reset_no_effect_warning()
    m = make_module()
    with pytest.warns(RuntimeWarning, match="vae placement 'swap' has no effect"):
        placement = place_component(m, "swap", "cpu", name="vae")
    assert not placement.swaps and placement.execution_device == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        place_component(make_module(), "swap", "cpu", name="text_encoder")
    with placement.on_device() as mod:
        assert mod is m
    assert placement.summary() == {"mode": "swap", "swaps": False, "execution_device": "cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_stage_memory_without_cuda_reports_none():
    mem = StageMemory("cpu")
    with mem.stage("text"):
        torch.ones(10)
    with mem.stage("denoise"):
        pass
    assert mem.as_dict() == {"text": {"allocated_bytes": None, "reserved_bytes": None},
                             "denoise": {"allocated_bytes": None, "reserved_bytes": None}}
    assert peak_memory_bytes("cpu") is None and gib(None) is None
    host = mem.host_as_dict()  # the process's peak RSS at each stage's end: a running maximum
    assert list(host) == ["text", "denoise"] and 0 < host["text"] <= host["denoise"]
    assert gib(3 * 2**29) == 1.5
