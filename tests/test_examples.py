"""The files in examples/ run as the README shows them: under torchrun with 2 ranks, or one process."""
import os
import re
import subprocess
import sys

import pytest

from lightx2v_sp.models import tiny
from lightx2v_sp.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    tiny.ensure_tiny_model(cache)
    return dict(os.environ, LIGHTX2V_SP_CACHE=cache, OMP_NUM_THREADS="1",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(env, example, *args, ranks=2):
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    r = subprocess.run([*launcher, os.path.join(ROOT, "examples", example), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _diffs(out):
    return [float(x) for x in re.findall(r"max \|[^|]+\| = ([0-9.e+-]+)", out)]


def test_ulysses_attention_example(env):
    out = _run(env, "ulysses_attention.py")
    assert "tokens per rank [501, 500]" in out
    exact, rr, fp8 = _diffs(out)
    assert exact <= 1e-5 and rr <= 1e-5 and 0 < fp8 <= 0.1  # fp8 on the wire is lossy, the rest exact


def test_wan_dit_example(env):
    out = _run(env, "wan_dit.py")
    assert "ulysses over 2 rank(s): output [1, 16, 3, 8, 8]" in out and _diffs(out)[0] <= 1e-4


def test_generate_api_example(env, tmp_path):
    out = _run(env, "generate_api.py", f"output.path={tmp_path}/api.mp4", ranks=1)
    assert f"wrote {tmp_path}/api.mp4: 9 frames" in out and '"attention_backend": "sdpa"' in out
    assert os.path.getsize(tmp_path / "api.mp4") > 1000 and os.path.isfile(tmp_path / "api.json")


def test_t5_encoder_example(env):
    out = _run(env, "t5_encoder.py")
    assert "mode=tp over 2 rank(s)" in out and "mode=dp over 2 rank(s)" in out
    assert all(d <= 1e-4 for d in _diffs(out)) and len(_diffs(out)) == 2
