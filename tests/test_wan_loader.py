"""Checkpoint loading in both layouts (single file and sharded) and its errors."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightx2v_sp.models.wan import WanModel, save_pretrained
from helpers import ATOL, diffusers_forward, diffusers_model, make_inputs, tiny_config

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config()
    ref = diffusers_model(cfg, seed=3)
    x, t, ctx = make_inputs(cfg)
    expected = diffusers_forward(ref, x, t, ctx)
    return cfg, ref, (x, t, ctx), expected, tmp_path_factory


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def _keys(path):
    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            keys |= set(h.keys())
    return keys


@pytest.mark.parametrize("shard", [None, "30KB"], ids=["single", "sharded"])
def test_diffusers_save_pretrained_layout(setup, shard):
    """Files written by diffusers itself load and reproduce diffusers' output."""
    cfg, ref, inputs, expected, tmp = setup
    path = tmp.mktemp("diffusers")
    ref.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    assert (path / (WEIGHTS + ".index.json")).is_file() == bool(shard)
    model = WanModel.from_pretrained(path)
    torch.testing.assert_close(_run(model, inputs), expected, atol=ATOL, rtol=0)


def test_diffusers_pipeline_directory(setup):
    """A pipeline folder (model_index.json + transformer/) is found through its transformer/ subfolder."""
    cfg, ref, inputs, expected, tmp = setup
    root = tmp.mktemp("pipeline")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    ref.save_pretrained(root / "transformer")
    torch.testing.assert_close(_run(WanModel.from_pretrained(root), inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000], ids=["single", "sharded"])
def test_official_layout_roundtrip(setup, max_shard_bytes):
    cfg, ref, inputs, expected, tmp = setup
    src = tmp.mktemp("src")
    ref.save_pretrained(src)
    model = WanModel.from_pretrained(src)
    path = tmp.mktemp("official")
    save_pretrained(model, path, layout="official", max_shard_bytes=max_shard_bytes)
    config = json.loads((path / "config.json").read_text())
    assert config["dim"] == cfg.dim and config["num_heads"] == cfg.num_heads and config["model_type"] == "t2v"
    keys = _keys(path)
    for key in ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.2.bias",
                "time_projection.1.weight", "blocks.0.self_attn.q.weight", "blocks.1.self_attn.norm_k.weight",
                "blocks.0.norm3.weight", "blocks.0.cross_attn.v.bias", "blocks.0.ffn.2.weight",
                "blocks.1.modulation", "head.head.weight", "head.modulation"):
        assert key in keys, key
    assert not any("qkv" in k or ".kv." in k for k in keys)
    if max_shard_bytes:
        index = json.loads((path / (WEIGHTS + ".index.json")).read_text())
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == keys
    reloaded = WanModel.from_pretrained(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n
    torch.testing.assert_close(_run(reloaded, inputs), expected, atol=ATOL, rtol=0)


def test_official_prefixed_keys(setup):
    """Repacks that prefix every key with model.diffusion_model. load too."""
    cfg, ref, inputs, expected, tmp = setup
    src = tmp.mktemp("src")
    ref.save_pretrained(src)
    path = tmp.mktemp("prefixed")
    save_pretrained(WanModel.from_pretrained(src), path, layout="official")
    tensors = load_file(path / WEIGHTS)
    save_file({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, path / WEIGHTS)
    torch.testing.assert_close(_run(WanModel.from_pretrained(path), inputs), expected, atol=ATOL, rtol=0)


def test_our_diffusers_writer_is_read_by_diffusers(setup):
    """Our diffusers-layout writer: diffusers builds the model from our config.json and takes our
    tensors with strict=True (same names, same shapes). (diffusers' from_pretrained would need
    `accelerate` here, which the environment does not have.)"""
    from diffusers import WanTransformer3DModel

    cfg, ref, inputs, expected, tmp = setup
    src = tmp.mktemp("src")
    ref.save_pretrained(src)
    path = tmp.mktemp("ours_as_diffusers")
    save_pretrained(WanModel.from_pretrained(src), path, layout="diffusers", max_shard_bytes=50_000)
    theirs = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(path))
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    theirs.load_state_dict(state, strict=True)
    torch.testing.assert_close(diffusers_forward(theirs.eval(), *inputs), expected, atol=0, rtol=0)


def test_load_into_dtype(setup):
    cfg, ref, inputs, expected, tmp = setup
    path = tmp.mktemp("src")
    ref.save_pretrained(path)
    model = WanModel.from_pretrained(path, dtype=torch.float16)
    assert model.blocks[0].ffn[0].weight.dtype == torch.float16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())


@pytest.fixture()
def official_dir(setup):
    cfg, ref, inputs, expected, tmp = setup
    src = tmp.mktemp("src")
    ref.save_pretrained(src)
    path = tmp.mktemp("bad")
    save_pretrained(WanModel.from_pretrained(src), path, layout="official")
    return path


def _rewrite(path, edit):
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS)


def test_missing_key_is_named(official_dir):
    _rewrite(official_dir, lambda t: (t.pop("blocks.1.self_attn.k.bias"), t.pop("head.modulation")))
    with pytest.raises(ValueError, match=r"2 missing keys: blocks\.1\.self_attn\.k\.bias, head\.modulation"):
        WanModel.from_pretrained(official_dir)


def test_unexpected_key_is_named(official_dir):
    _rewrite(official_dir, lambda t: t.update({"blocks.0.self_attn.k_img.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"1 unexpected keys: blocks\.0\.self_attn\.k_img\.weight"):
        WanModel.from_pretrained(official_dir)


def test_wrong_shape_names_key_and_shapes(official_dir):
    _rewrite(official_dir, lambda t: t.update({"blocks.0.ffn.0.weight": torch.zeros(255, 96)}))
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.0\.weight: checkpoint has shape \(255, 96\), "
                                         r"model expects \(256, 96\)"):
        WanModel.from_pretrained(official_dir)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        WanModel.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no config.json"):
        WanModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="neither an official"):
        WanModel.from_pretrained(tmp_path)
