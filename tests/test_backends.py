"""Registration and `auto` choice of the local attention kernels, with fake packages on the CPU.

The GPU-side numbers (each kernel against SDPA math) are in test_gpu_kernels.py and the GPU lane;
here the registry logic runs against fake `flash_attn` / `sageattention` packages written to a
temporary directory, and a faked compute capability.
"""
import sys

import pytest
import torch

from lightx2v_sp.attention import attention, backends
from lightx2v_sp.attention.names import BACKEND_CHOICES
from lightx2v_sp.config import load_config

FAKES = ("flash_attn", "flash_attn.cute", "flash_attn_interface", "sageattention")


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Write packages into tmp_path; the registry is rebuilt from them and restored afterwards."""
    def write(files: dict[str, str]):
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for name in FAKES:
            sys.modules.pop(name, None)
        backends.discover()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield write
    for name in FAKES:
        sys.modules.pop(name, None)
    monkeypatch.undo()
    backends.discover()


def _gpu(monkeypatch, major: int):
    monkeypatch.setattr(backends, "_capability", lambda device: (major, 0))


FA4_ONLY = {"flash_attn/cute/__init__.py": "def flash_attn_func(q, k, v):\n    return q\n"}
LOSSY_SAGE = {"sageattention/__init__.py": "def sageattn(q, k, v, tensor_layout, is_causal):\n    return q\n"}


def test_flash_attn4_alone_does_not_register_flash_attn2(fake_packages, monkeypatch):
    # Installing flash-attn-4 creates a `flash_attn` namespace package with no flash_attn_func: the
    # old registry registered FA2 from it and `auto` crashed with an AttributeError on the GPU.
    fake_packages(FA4_ONLY)
    names = backends.available_backends()
    assert "flash_attn4" in names and "flash_attn" in names
    assert "flash_attn2" not in names and "flash_attn3" not in names
    _gpu(monkeypatch, 9)
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn4"
    assert backends.resolve_backend("flash_attn", "cuda", torch.bfloat16) == "flash_attn"


def test_auto_never_picks_a_lossy_kernel(fake_packages, monkeypatch):
    fake_packages(LOSSY_SAGE)
    assert not backends.kernel_info("sage").exact
    for major, expected in ((9, "sdpa_cudnn"), (8, "sdpa"), (7, "sdpa")):
        _gpu(monkeypatch, major)
        backends._auto_choice.clear()
        assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == expected
    assert backends.resolve_backend("sage", "cuda", torch.bfloat16) == "sage"  # by name it runs
    assert backends.resolve_backend("auto", "cpu", torch.float32) == "sdpa"


def test_auto_follows_the_documented_preference(fake_packages, monkeypatch):
    fake_packages({**FA4_ONLY, **LOSSY_SAGE,
                   "flash_attn/__init__.py": "def flash_attn_func(q, k, v):\n    return q\n",
                   "flash_attn_interface.py": "def flash_attn_func(q, k, v):\n    return q, None\n"})
    assert {"flash_attn2", "flash_attn3", "flash_attn4"} <= set(backends.available_backends())
    _gpu(monkeypatch, 9)
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn4"
    assert backends.resolve_backend("auto", "cuda", torch.float32) == "sdpa"  # flash kernels: half only
    backends.unregister_backend("flash_attn4")
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn3"
    _gpu(monkeypatch, 8)
    backends._auto_choice.clear()
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn2"  # FA3 is Hopper-only
    for major in (8, 9, 10, 12):
        _gpu(monkeypatch, major)
        backends._auto_choice.clear()
        assert backends.kernel_info(backends.resolve_backend("auto", "cuda", torch.bfloat16)).exact


def test_named_kernel_that_cannot_run_is_a_clear_error(fake_packages):
    fake_packages(FA4_ONLY)
    with pytest.raises(ValueError, match="cannot run torch.float32 tensors .* on cpu"):
        attention(*(torch.zeros(1, 4, 2, 8) for _ in range(3)), backend="flash_attn4")
    with pytest.raises(ValueError, match="pip install flash-attn"):
        backends.resolve_backend("flash_attn2", "cpu", torch.float32)


def test_opaque_kernel_under_torch_compile(fake_packages):
    # model.compile: external kernels are custom ops with a fake, so dynamo neither traces them nor breaks
    backends.register_backend("double", backends._opaque("test_double", lambda q, k, v: q * 2))
    q = torch.randn(1, 6, 2, 8)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q):
        return attention(q, q, q, backend="double") + 1

    assert torch.equal(f(q), q * 2 + 1)
    backends.unregister_backend("double")


def test_every_config_choice_is_a_backend_name():
    known = set(backends.available_backends()) | set(backends.INSTALL_HINTS) | {"auto"}
    assert set(BACKEND_CHOICES) <= known
    for name in BACKEND_CHOICES:
        assert load_config(None, [f"attention.backend={name}"]).attention.backend == name


def _strides_seen(rank: int, world: int, fuse: bool):
    from lightx2v_sp.attention import ulysses_attention
    from lightx2v_sp.distributed import ParallelDims

    seen = []

    def recorder(q, k, v):
        seen.append([(t.is_contiguous(), t.stride()) for t in (q, k, v)])
        return backends._sdpa(q, k, v)

    backends.register_backend("recorder", recorder)
    dims = ParallelDims(ulysses_degree=world)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 5, 4, 8, generator=g) for _ in range(3))
    ulysses_attention(q, k, v, group=dims.sp_group, seq_sizes=[5] * world, fuse_qkv=fuse, backend="recorder")
    return seen


def test_kernel_gets_the_exchange_buffers_as_views():
    # After the Ulysses exchange q, k, v are strided views into the receive buffer; we hand them to
    # the kernel as they are (FlashAttention and SDPA take any layout with a unit last stride and
    # copy only what they refuse), instead of copying each to a contiguous tensor first.
    from lightx2v_sp.testing import run_on_ranks

    for fuse in (True, False):
        for seen in run_on_ranks(_strides_seen, 2, fuse):
            (call,) = seen
            for contiguous, stride in call:
                # token stride of the receive buffer [S, m, B, Hp, D]: m * B * Hp * D, m = 3 fused
                assert stride[-1] == 1 and stride[1] == (48 if fuse else 16)
                assert contiguous is not fuse  # fused: interleaved q|k|v rows, passed as they are


def test_lse_capability_follows_the_installed_signature(fake_packages, monkeypatch):
    # Ring attention needs each block's log-sum-exp: a FlashAttention build whose flash_attn_func has the
    # keyword (FA4 return_lse, FA2/FA3 return_attn_probs) registers an lse form, one without does not,
    # and `auto` for a ring skips the kernels without it.
    fake_packages({"flash_attn/cute/__init__.py": "def flash_attn_func(q, k, v, return_lse=False):\n"
                                                  "    return (q, 'lse') if return_lse else (q, None)\n",
                   "flash_attn_interface.py": "def flash_attn_func(q, k, v):\n    return q, None\n"})
    assert backends.kernel_info("flash_attn4").lse is not None and backends.kernel_info("flash_attn3").lse is None
    assert backends.kernel_info("flash_attn").lse is None  # its pick may be FA3, which has none
    _gpu(monkeypatch, 9)
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn4"
    backends.unregister_backend("flash_attn4")
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn3"
    assert backends.resolve_backend("auto", "cuda", torch.bfloat16, need_lse=True) == "sdpa_cudnn"
    with pytest.raises(ValueError, match="'flash_attn3' does not return its log-sum-exp"):
        backends.resolve_backend("flash_attn3", "cuda", torch.bfloat16, need_lse=True)
    for name in ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math"):
        assert backends.kernel_info(name).lse is not None, name
