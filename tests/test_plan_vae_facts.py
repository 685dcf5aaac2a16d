"""The memory plan's VAE facts: worked out from diffusers' module once, then read from the cache, so
a later preflight plans without importing diffusers' autoencoders (seconds; a text-to-video run
imports them while it denoises instead)."""
import json
import os
import subprocess
import sys

import pytest

from lightx2v_sp import plan_vae_facts
from lightx2v_sp.plan_vae_facts import measure, vae_facts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wan2.1's VAE (diffusers' defaults) and Wan2.2's (TI2V-5B: 48 channels, patchified output)
WAN21 = {}
WAN22 = {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "is_residual": True,
         "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTX2V_SP_CACHE", str(tmp_path))
    monkeypatch.setattr(plan_vae_facts, "_FACTS", {})
    return tmp_path


@pytest.mark.parametrize("kwargs", [WAN21, WAN22], ids=["wan21", "wan22"])
def test_facts_from_the_cache_are_the_modules(cache, kwargs, monkeypatch):
    measured = measure(kwargs)
    assert vae_facts(kwargs) == measured
    assert len(os.listdir(cache / "plan")) == 1
    plan_vae_facts._FACTS.clear()
    monkeypatch.setattr(plan_vae_facts, "measure", None)  # a second read must not work them out again
    assert vae_facts(kwargs) == measured
    if kwargs is WAN21:  # the row-band decode's halos (vae_rows.py: 13 latent rows, 7 pixel rows at the top)
        assert measured.unsupported is None and measured.top == 8 and dict(measured.halos)[1] == 13
        assert dict(measured.halos)[8] == 7 and measured.numel == 126892531
    else:
        assert "Wan2.2" in measured.unsupported


def test_a_damaged_or_other_version_file_is_worked_out_again(cache, monkeypatch):
    facts = vae_facts(WAN21)
    (path,) = [cache / "plan" / f for f in os.listdir(cache / "plan")]
    path.write_text('{"numel": "not a number"')
    plan_vae_facts._FACTS.clear()
    assert vae_facts(WAN21) == facts and json.loads(path.read_text())["numel"] == facts.numel
    monkeypatch.setattr(plan_vae_facts, "_diffusers_version", lambda: "0.0.1")  # another diffusers: its own file
    plan_vae_facts._FACTS.clear()
    assert vae_facts(WAN21) == facts and len(os.listdir(cache / "plan")) == 2


def test_an_unwritable_cache_still_plans(cache, monkeypatch):
    monkeypatch.setattr(plan_vae_facts, "writable_dir", lambda path: False)
    assert vae_facts(WAN22) == measure(WAN22) and not (cache / "plan").exists()


PLAN = """
import sys
from lightx2v_sp.config import load_config
from lightx2v_sp.plan import plan_rank
from lightx2v_sp.plan_sizes import model_shapes
cfg = load_config("configs/wan_t2v_1.3b_480p.yaml", [])
plan = plan_rank(cfg, model_shapes(cfg.model), 1, 0)
print(plan.gpu_peak, "diffusers.models" in sys.modules)
"""


def test_a_later_preflight_plans_without_importing_diffusers_models(tmp_path, real_configs):
    env = {**os.environ, "LIGHTX2V_SP_CACHE": str(tmp_path)}

    def plan():
        out = subprocess.run([sys.executable, "-c", PLAN], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        peak, imported = out.stdout.split()
        return int(peak), imported == "True"

    first, second = plan(), plan()
    assert first[1] and not second[1]  # the first works the facts out; the second reads them
    assert first[0] == second[0] > 0
