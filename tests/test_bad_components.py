"""Broken components and non-finite numbers: a ValueError that names where, no video, no traceback.

In-process runs of the tiny model (one rank) on copies of its directory with one file damaged:
a NaN in one weight of the DiT, the VAE or UMT5; a truncated safetensors file; a bad VAE file; a
config.json with num_heads 0. And NaN that appears mid-denoise or in the decoded frames.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightx2v_sp.config import load_config
from lightx2v_sp.models import tiny
from lightx2v_sp.pipeline import AgreedError, run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")
DIT = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny.ensure_tiny_model(str(tmp_path_factory.mktemp("cache")))


def _copy(src, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(src, model)
    return model


def _poison(file, key_part):
    state = load_file(file)
    key = sorted(k for k in state if key_part in k and state[k].is_floating_point())[0]
    state[key].view(-1)[-1] = float("nan")
    save_file(state, file, metadata={"format": "pt"})
    return key


def _run(model, tmp_path, *overrides):
    out = tmp_path / "out" / "v.mp4"
    cfg = load_config(CONFIG, [f"model.path={model}", f"output.path={out}", "sample.steps=3", *overrides])
    with pytest.raises(AgreedError) as err:
        run(cfg, torch.device("cpu"), progress=False)
    assert not err.value.internal  # a user error: exit status 2, no traceback
    assert not out.exists() and not (tmp_path / "out" / "v.json").exists()
    assert not [n for n in os.listdir(out.parent) if n.endswith(".tmp.mp4")]
    return str(err.value)


@pytest.mark.parametrize("file, key_part, component", [
    (DIT, "blocks.1.ffn", "DiT"),
    ("vae/diffusion_pytorch_model.safetensors", "decoder.conv_out", "VAE"),
    ("text_encoder/model.safetensors", "SelfAttention.q", "UMT5 text encoder"),
])
def test_nan_weights_name_the_component(src, tmp_path, file, key_part, component):
    model = _copy(src, tmp_path)
    _poison(model / file, key_part)
    message = _run(model, tmp_path)
    assert message.startswith(f"the {component} weights at ") and "NaN or inf" in message, message


def test_truncated_safetensors_names_the_file(src, tmp_path):
    model = _copy(src, tmp_path)
    data = (model / DIT).read_bytes()
    (model / DIT).write_bytes(data[: len(data) // 2])
    message = _run(model, tmp_path)
    assert message.startswith("could not load the DiT from ") and "truncated" in message, message


def test_bad_vae_file_is_about_the_vae(src, tmp_path):
    model = _copy(src, tmp_path)
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    message = _run(model, tmp_path)
    assert "the VAE" in message and "DiT" not in message, message


def test_zero_heads_in_model_config(src, tmp_path):
    model = _copy(src, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_heads": 0}))
    message = _run(model, tmp_path)
    assert message.startswith("the DiT's config.json gives num_heads=0; it must be a positive integer"), message
    # the model class itself says so too (for a load without the preflight)
    from lightx2v_sp.models.wan import WanModel

    with pytest.raises(ValueError, match="Wan config num_heads=0 must be a positive integer"):
        WanModel.from_pretrained(str(model))


def test_nan_latents_name_the_step(src, tmp_path, monkeypatch):
    from lightx2v_sp.pipeline import denoise as denoise_mod

    real, calls = denoise_mod.guided_prediction, []

    def overflowing(*args, **kwargs):
        calls.append(1)
        v = real(*args, **kwargs)
        return v * float("inf") if len(calls) == 2 else v

    monkeypatch.setattr(denoise_mod, "guided_prediction", overflowing)
    message = _run(src, tmp_path)
    assert "NaN or inf after denoising step 2 of 3" in message and len(calls) == 2, message


def test_nan_video_is_not_written(src, tmp_path, monkeypatch):
    from lightx2v_sp.models.vae import WanVAE

    real = WanVAE.decode
    monkeypatch.setattr(WanVAE, "decode", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    message = _run(src, tmp_path)
    assert message.startswith("the decoded video holds NaN or inf"), message


def test_long_prompt_is_cut_with_a_warning(src, tmp_path):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("lightx2v_sp")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        cfg = load_config(CONFIG, [f"model.path={src}", f"output.path={tmp_path / 'v.mp4'}", "sample.steps=1",
                                   "prompt=" + "a cat walks " * 20])  # 60 words + </s>, text_len 32
        result = run(cfg, torch.device("cpu"), progress=False)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    text = result.summary["text"]
    cut = text["prompt_tokens"][0] + text["cut_tokens"][0]
    assert text["text_len"] == 32 and text["prompt_tokens"][0] == 32 and text["cut_tokens"] == [cut - 32, 0]
    assert cut > 32
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings == [f"warning: prompt has {cut} tokens; text_encoder.text_len=32 keeps the first 32 "
                        f"and cuts {cut - 32}"], warnings
    assert json.loads((tmp_path / "v.json").read_text())["text"]["cut_tokens"] == [cut - 32, 0]
