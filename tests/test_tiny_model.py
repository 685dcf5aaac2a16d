"""The embedded tiny model: built once, atomically, safely under concurrency; loads with the real loaders."""
import json
import multiprocessing as mp
import os

import pytest
import torch

from lightx2v_sp.models import tiny
from lightx2v_sp.pipeline.paths import resolve_model_paths


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    path = tiny.ensure_tiny_model(root)
    return root, path


def test_layout_and_marker(cache):
    root, path = cache
    assert path == os.path.join(root, f"tiny-{tiny.TINY_VERSION}")
    with open(os.path.join(path, tiny.MARKER)) as f:
        meta = json.load(f)
    assert meta["version"] == tiny.TINY_VERSION and meta["dit"] == tiny.TINY_WAN
    # no temporary build directory is left behind
    assert sorted(n for n in os.listdir(root) if not n.endswith(".lock")) == [os.path.basename(path)]
    paths = resolve_model_paths(path)
    assert paths.dit == path and paths.dit_layout == "official"
    assert paths.text_encoder.endswith("text_encoder") and paths.vae.endswith("vae")
    assert paths.num_heads == 12


def test_second_call_reuses_the_build(cache, monkeypatch):
    root, path = cache
    mtime = os.path.getmtime(os.path.join(path, tiny.MARKER))

    def boom(_):
        raise AssertionError("the tiny model was rebuilt although a complete copy exists")

    monkeypatch.setattr(tiny, "write_tiny_model", boom)
    assert tiny.ensure_tiny_model(root) == path
    assert os.path.getmtime(os.path.join(path, tiny.MARKER)) == mtime


def test_first_build_says_so(tmp_path, monkeypatch, caplog):
    def marker_only(path):  # the files do not matter here, only the message
        open(os.path.join(path, tiny.MARKER), "w").close()

    monkeypatch.setattr(tiny, "write_tiny_model", marker_only)
    with caplog.at_level("INFO", logger="lightx2v_sp"):
        path = tiny.ensure_tiny_model(str(tmp_path))
        tiny.ensure_tiny_model(str(tmp_path))
    said = [r.getMessage() for r in caplog.records if "tiny model" in r.getMessage()]
    assert said == [f"building the embedded tiny model in {path} (once)"]


def test_loads_with_the_real_loaders(cache):
    from transformers import AutoTokenizer

    from lightx2v_sp.models.t5 import T5Encoder
    from lightx2v_sp.models.vae import WanVAE
    from lightx2v_sp.models.wan import WanModel

    _, path = cache
    tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    ids = tok("A tiny cat walks on the grass.")["input_ids"]
    assert ids[-1] == 1 and max(ids) < tiny.TINY_T5["vocab_size"] and 2 not in ids  # no <unk> for plain text
    enc = T5Encoder.from_pretrained(os.path.join(path, "text_encoder"))
    assert enc.config.d_model == tiny.TINY_WAN["text_dim"]
    model = WanModel.from_pretrained(path)
    assert model.config.num_heads == 12 and model.config.in_dim == 16
    vae = WanVAE.from_pretrained(os.path.join(path, "vae"))
    assert vae.z_dim == model.config.in_dim
    # same seed, same weights: a rebuild elsewhere is bit-identical
    torch.manual_seed(0)
    again = tiny.tiny_model_dir(os.path.join(os.path.dirname(path), "again"))
    os.makedirs(again)
    tiny.write_tiny_model(again)
    other = WanModel.from_pretrained(again)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def _build(root, log):
    real = tiny.write_tiny_model

    def counted(path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        real(path)

    tiny.write_tiny_model = counted
    print(tiny.ensure_tiny_model(root))


def test_concurrent_builders_build_once(tmp_path):
    root, log = str(tmp_path / "c"), str(tmp_path / "log")
    ctx = mp.get_context("fork")  # fork: no re-import, the processes start at once and race
    procs = [ctx.Process(target=_build, args=(root, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with open(log) as f:
        assert len(f.read().split()) == 1  # one builder; the others waited on the lock and reused it
    assert tiny.is_built(tiny.tiny_model_dir(root))
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def half(path):
        open(os.path.join(path, "config.json"), "w").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "write_tiny_model", half)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.ensure_tiny_model(str(tmp_path))
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == []


def test_unwritable_cache_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="LIGHTX2V_SP_CACHE"):
        tiny.ensure_tiny_model("/proc/lightx2v_sp_cache")
