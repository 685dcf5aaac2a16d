"""Hugging Face repo ids as model paths, resolved offline from a cache this test lays out itself.

The cache is built exactly as huggingface_hub writes it: `models--org--name/refs/<branch>` holds a
commit, `snapshots/<commit>/<path>` are relative symlinks into `blobs/<sha256>`. Its files are the
tiny model's, so a run from the repo id must give the same latents as a run from the directory.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lightx2v_sp.config import ModelConfig, load_config
from lightx2v_sp.models import tiny
from lightx2v_sp.models.wan import WanModel
from lightx2v_sp.pipeline import hub, model_paths_for, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml")
REPO = "Wan-AI/Wan2.1-T2V-tiny"
COMMIT_A = "a" * 40  # main: the tiny model as built (official DiT at the top)
COMMIT_B = "b" * 40  # tag v2: the same weights in the diffusers layout


def add_snapshot(cache, repo_id, commit, src, refs=()):
    """Put the files under `src` into `cache` as snapshot `commit` of `repo_id`, as huggingface_hub does."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for d, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), src)
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            if not os.path.exists(blob):
                with open(blob, "wb") as f:
                    f.write(data)
            link = os.path.join(repo, "snapshots", commit, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)  # huggingface_hub writes the bare hash, no newline
    return os.path.join(repo, "snapshots", commit)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    src = tiny.ensure_tiny_model(str(base / "lx_cache"))
    diff = base / "diffusers"
    WanModel.from_pretrained(src).save_pretrained(diff / "transformer", layout="diffusers")
    for name in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(os.path.join(src, name), diff / name)
    (diff / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    cache = str(base / "hf" / "hub")
    snap_a = add_snapshot(cache, REPO, COMMIT_A, src, refs=["main"])
    snap_b = add_snapshot(cache, REPO, COMMIT_B, str(diff), refs=["v2"])
    return {"cache": cache, "tiny": src, "a": snap_a, "b": snap_b}


@pytest.fixture
def offline(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", hf_cache["cache"])
    return hf_cache


def test_repo_id_resolves_to_its_snapshot(offline):
    paths = model_paths_for(ModelConfig(path=REPO))
    assert paths.root == offline["a"] and paths.dit_layout == "official" and paths.num_heads == 12
    assert paths.vae == os.path.join(offline["a"], "vae")


@pytest.mark.parametrize("revision, commit, layout", [("v2", COMMIT_B, "diffusers"), (COMMIT_A, COMMIT_A, "official"),
                                                      ("main", COMMIT_A, "official")])
def test_revision_selects_the_snapshot(offline, revision, commit, layout):
    paths = model_paths_for(ModelConfig(path=REPO, revision=revision))
    assert paths.root.endswith(os.path.join("snapshots", commit)) and paths.dit_layout == layout


def test_component_repo_id_with_subfolder(offline):
    paths = model_paths_for(ModelConfig(path=offline["tiny"], vae_path=f"{REPO}/vae"))
    assert paths.root == offline["tiny"] and paths.vae == os.path.join(offline["a"], "vae")


@pytest.mark.parametrize("repo, revision", [("Wan-AI/not-in-the-cache", None), (REPO, "v3")])
def test_missing_repo_names_the_id_and_the_cache(offline, repo, revision):
    with pytest.raises(ValueError) as e:
        model_paths_for(ModelConfig(path=repo, revision=revision))
    msg = str(e.value)
    assert repr(repo) in msg and offline["cache"] in msg and "HF_HUB_OFFLINE=1" in msg
    assert f"revision {revision or 'main'}" in msg and f"hf download {repo}" in msg


def test_run_from_repo_id_equals_run_from_directory(offline, tmp_path):
    results = {}
    for name, path in (("hub", REPO), ("dir", offline["tiny"])):
        cfg = load_config(CONFIG, [f"model.path={path}", "sample.steps=1", "parallel.ulysses_degree=1",
                                   f"output.path={tmp_path}/{name}.mp4"])
        results[name] = run(cfg, torch.device("cpu"), progress=False)
    assert torch.equal(results["hub"].latents, results["dir"].latents)
    assert results["hub"].summary["model"]["root"] == offline["a"]


def test_cli_offline_missing_id_is_one_error_line(hf_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"), OMP_NUM_THREADS="1",
               LIGHTX2V_SP_CACHE=str(tmp_path / "lx"), PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "lightx2v_sp.generate", "--config", CONFIG,
                        "model.path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers", f"output.path={tmp_path}/v.mp4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'" in errors[0] and str(tmp_path / "empty") in errors[0]
    assert not os.path.exists(tmp_path / "v.mp4")


def test_repo_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "wan").mkdir(parents=True)
    assert hub.split_repo_id("Wan-AI/Wan2.1-T2V-1.3B") == ("Wan-AI/Wan2.1-T2V-1.3B", "")
    assert hub.split_repo_id("models/wan") is None  # an existing relative directory stays a directory
    assert hub.split_repo_id("/data/Wan2.1") is None and hub.split_repo_id("./a/b") is None
    assert hub.split_repo_id("org/name/vae") is None  # the whole model: no subfolder
    assert hub.split_repo_id("org/name/vae", allow_subfolder=True) == ("org/name", "vae")


def test_download_once_per_launch(tmp_path, monkeypatch):
    """Online: the first local rank downloads only the loaders' files; a peer of the same launch
    then resolves the commit it got from the cache, without the network."""
    calls = []
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)

    def fake_snapshot_download(repo_id, **kw):
        calls.append(dict(kw, repo_id=repo_id))
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # -> cache $HF_HOME/hub
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert hub.resolve_repo("org/name", "v1") == str(snapshot)
    assert hub.resolve_repo("org/name", "v1") == str(snapshot)  # the second local rank
    first, second = calls
    assert first["cache_dir"] == str(tmp_path / "hub") and first["local_files_only"] is False
    assert first["revision"] == "v1" and {"transformer/*", "Wan2.1_VAE.pth", "google/umt5-xxl/*"} <= set(
        first["allow_patterns"]) and "*" not in first["allow_patterns"]
    assert second["local_files_only"] is True and second["revision"] == "c" * 40
    monkeypatch.setenv("MASTER_PORT", "30000")  # another launch: asks the Hub again
    hub.resolve_repo("org/name", "v1")
    assert calls[-1]["local_files_only"] is False


def _rank_resolves(rank, cache, log):
    """One local rank of a launch (a forked process): a fake Hub that takes a second to 'download'."""
    import time

    import huggingface_hub

    def fake_snapshot_download(repo_id, **kw):
        with open(log, "a") as f:
            f.write(f"{rank} {'cache' if kw['local_files_only'] else 'download'}\n")
        if not kw["local_files_only"]:
            time.sleep(1.0)  # the other rank arrives meanwhile and must wait on the lock
        path = os.path.join(cache, "models--org--name", "snapshots", "d" * 40)
        os.makedirs(path, exist_ok=True)
        return path

    huggingface_hub.snapshot_download = fake_snapshot_download
    os.environ.update(LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_PORT="29123", HF_HUB_CACHE=cache)
    os.environ.pop("HF_HUB_OFFLINE", None)
    path = hub.resolve_repo("org/name")
    with open(log, "a") as f:
        f.write(f"{rank} got {path}\n")


def test_local_ranks_download_once(tmp_path):
    import multiprocessing as mp

    log = tmp_path / "calls.txt"
    ctx = mp.get_context("fork")  # siblings of one parent, like torchrun's local ranks
    procs = [ctx.Process(target=_rank_resolves, args=(r, str(tmp_path / "hub"), str(log))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert sorted(x for x in lines if not x.startswith("got")) == ["cache", "download"]  # downloaded once
    got = {x for x in lines if x.startswith("got")}
    assert len(got) == 1 and got.pop().endswith("d" * 40)  # both ranks use the same snapshot


OFFICIAL_I2V_CONFIG = {"_class_name": "WanModel", "model_type": "i2v", "dim": 96, "num_heads": 6, "in_dim": 36}


@pytest.mark.parametrize("model_type, fragment", [("i2v", "official-layout Wan2.1 I2V model: its CLIP encoder"),
                                                  ("ti2v", "official-layout Wan2.2 TI2V-5B model")])
def test_official_layouts_we_cannot_run_are_refused_from_their_config(tmp_path, monkeypatch, model_type, fragment):
    """Offline: a cached snapshot holding only the config.json of an official Wan2.1 I2V / TI2V repo is refused
    for what it is (not as an incomplete download)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(dict(OFFICIAL_I2V_CONFIG, model_type=model_type)))
    cache = str(tmp_path / "hub")
    snap = add_snapshot(cache, "Wan-AI/Official-tiny", "e" * 40, str(src), refs=["main"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    with pytest.raises(ValueError, match=fragment) as err:
        model_paths_for(ModelConfig(path="Wan-AI/Official-tiny"))
    assert snap in str(err.value) and "-Diffusers layout" in str(err.value)


def test_official_i2v_repo_is_refused_before_its_weights_are_fetched(tmp_path, monkeypatch):
    """Online: the first request fetches only the top-level configs; a refused checkpoint stops there (no DiT
    shards, no CLIP .pth), and a runnable one is then fetched whole at the commit its configs came from."""
    import huggingface_hub

    calls = []
    configs = {"org/i2v": OFFICIAL_I2V_CONFIG, "org/t2v": dict(OFFICIAL_I2V_CONFIG, model_type="t2v", in_dim=16)}

    def fake_snapshot_download(repo_id, **kw):
        calls.append(dict(kw, repo_id=repo_id))
        snap = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("f" * 40)
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text(json.dumps(configs[repo_id]))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="official-layout Wan2.1 I2V model"):
        model_paths_for(ModelConfig(path="org/i2v"))
    assert [c["allow_patterns"] for c in calls] == [list(hub.PRECHECK_PATTERNS)]
    calls.clear()
    with pytest.raises(ValueError, match="is incomplete"):  # the fake hub has no weights: fetched, then missed
        model_paths_for(ModelConfig(path="org/t2v", revision="v1"))
    assert [(c["revision"], c["allow_patterns"]) for c in calls] == [
        ("v1", list(hub.PRECHECK_PATTERNS)), ("f" * 40, list(hub.ALLOW_PATTERNS))]
    assert not any(p.startswith(("models_clip", "xlm-roberta")) or "Wan2.2_VAE" in p for p in hub.ALLOW_PATTERNS)
