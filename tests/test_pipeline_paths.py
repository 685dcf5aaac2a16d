"""Model directories: both released layouts resolve and load to the same video; incomplete ones fail clearly.

The official and diffusers directories are written from the tiny model's weights with the
project's writers (and the official VAE file with the inverse of the key conversion), so the
three directories hold the same numbers and must give bit-identical latents and frames.
"""
import json
import os
import shutil

import pytest
import torch

from lightx2v_sp.config import load_config
from lightx2v_sp.models import tiny
from lightx2v_sp.models.t5 import T5Encoder, save_t5_encoder
from lightx2v_sp.models.vae import WanVAE, diffusers_to_official_state, load_vae
from lightx2v_sp.models.wan import WanModel
from lightx2v_sp.pipeline import resolve_model_paths, run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_t2v_tiny.yaml")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    src = tiny.ensure_tiny_model(str(base / "cache"))
    official = base / "Wan2.1-T2V-tiny"
    official.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(os.path.join(src, name), official / name)
    save_t5_encoder(T5Encoder.from_pretrained(os.path.join(src, "text_encoder")), official, layout="official")
    shutil.copytree(os.path.join(src, "tokenizer"), official / "google" / "umt5-xxl")
    vae = load_vae(os.path.join(src, "vae"))
    torch.save(diffusers_to_official_state(vae), official / "Wan2.1_VAE.pth")

    diff = base / "Wan2.1-T2V-tiny-Diffusers"
    WanModel.from_pretrained(src).save_pretrained(diff / "transformer", layout="diffusers")
    for name in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(os.path.join(src, name), diff / name)
    (diff / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return {"tiny": src, "official": str(official), "diffusers": str(diff)}


def test_both_layouts_resolve(dirs):
    off = resolve_model_paths(dirs["official"])
    assert off.dit_layout == "official" and off.dit == dirs["official"]
    assert off.text_encoder.endswith("models_t5_umt5-xxl-enc-bf16.pth")
    assert off.tokenizer.endswith(os.path.join("google", "umt5-xxl")) and off.vae.endswith("Wan2.1_VAE.pth")
    dif = resolve_model_paths(dirs["diffusers"])
    assert dif.dit_layout == "diffusers" and dif.dit.endswith("transformer") and dif.num_heads == 12
    assert dif.text_encoder.endswith("text_encoder") and dif.vae.endswith("vae")


def test_official_vae_file_decodes_like_the_diffusers_dir(dirs):
    a = WanVAE.from_pretrained(os.path.join(dirs["tiny"], "vae"))
    b = WanVAE.from_pretrained(os.path.join(dirs["official"], "Wan2.1_VAE.pth"))
    assert b.vae.config.num_res_blocks == 1 and list(b.vae.config.dim_mult) == [1, 2, 4, 4]
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.decode(z), b.decode(z))  # same weights, same modules: same bits


def test_same_video_from_every_layout(dirs, tmp_path):
    results = {}
    for name, path in dirs.items():
        cfg = load_config(CONFIG, [f"model.path={path}", "sample.steps=2", "parallel.ulysses_degree=1",
                                   f"output.path={tmp_path}/{name}.mp4"])
        results[name] = run(cfg, torch.device("cpu"), progress=False, keep_video=True)
    for name in ("official", "diffusers"):
        assert torch.equal(results[name].latents, results["tiny"].latents), name
        assert torch.equal(results[name].video, results["tiny"].video), name
    summary = json.loads((tmp_path / "official.json").read_text())
    assert summary["model"]["dit_layout"] == "official" and summary["model"]["root"] == dirs["official"]


@pytest.mark.parametrize("remove, expect", [
    ("Wan2.1_VAE.pth", "the VAE at"),
    ("models_t5_umt5-xxl-enc-bf16.pth", "the UMT5 text encoder"),
    ("google", "the tokenizer"),
    ("diffusion_pytorch_model.safetensors", "DiT weights"),
])
def test_incomplete_official_dir_names_what_is_missing(dirs, tmp_path, remove, expect):
    broken = tmp_path / "broken"
    shutil.copytree(dirs["official"], broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ValueError, match="incomplete") as err:
        resolve_model_paths(str(broken))
    assert expect in str(err.value) and str(broken) in str(err.value)


def test_incomplete_diffusers_dir_and_missing_dir(dirs, tmp_path):
    broken = tmp_path / "d"
    shutil.copytree(dirs["diffusers"], broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ValueError) as err:
        resolve_model_paths(str(broken))
    msg = str(err.value)
    assert "a DiT" in msg and "the VAE at" in msg and os.path.join(str(broken), "vae") in msg
    with pytest.raises(ValueError, match="is not a directory"):
        resolve_model_paths(str(tmp_path / "nowhere"))


def test_explicit_component_paths_override(dirs, tmp_path):
    p = resolve_model_paths(dirs["diffusers"], vae_path=os.path.join(dirs["official"], "Wan2.1_VAE.pth"))
    assert p.vae.endswith("Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match="set explicitly"):
        resolve_model_paths(dirs["diffusers"], tokenizer_path=str(tmp_path / "none"))
