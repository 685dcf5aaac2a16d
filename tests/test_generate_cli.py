"""`python -m lightx2v_sp.generate` as a user runs it: success, and every kind of bad input.

Bad input must give one `error: ...` line (no traceback), a non-zero exit on every rank, no
video, and no hang (each subprocess has a timeout well under the collective timeout).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from lightx2v_sp.models import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    tiny.ensure_tiny_model(path)
    return path


def _env(cache):
    env = dict(os.environ, LIGHTX2V_SP_CACHE=cache, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _generate(cache, *args, timeout=120):
    # the tiny config's ulysses_degree 0 means "all ranks": one here
    cmd = [sys.executable, "-m", "lightx2v_sp.generate", "--config", CONFIG, *args]
    return subprocess.run(cmd, cwd=ROOT,
                          env=_env(cache), capture_output=True, text=True, timeout=timeout)


def _torchrun(cache, *args, timeout=180):
    from lightx2v_sp.testing import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lightx2v_sp.generate", "--config", CONFIG, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "[rank"))]


def test_run_writes_video_and_summary(cache, tmp_path):
    out = tmp_path / "v" / "tiny.mp4"
    prompt = "${oc.env:HOME}: it's a cat #1"  # text, byte for byte: no interpolation, no YAML comment
    r = _generate(cache, "sample.steps=2", f"output.path={out}", f"prompt={prompt}")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.stat().st_size > 1000
    summary = json.loads((tmp_path / "v" / "tiny.json").read_text())
    assert summary["output_path"] == str(out) and summary["video"]["frames"] == 9
    assert summary["config"]["prompt"] == prompt and summary["lightx2v_sp_summary"] == 1
    assert sorted(os.listdir(out.parent)) == ["tiny.json", "tiny.mp4"]  # no temporary files left
    import imageio.v3 as iio

    frames = iio.imread(out)
    assert frames.shape == (9, 64, 64, 3)


@pytest.mark.parametrize("args, expect", [
    (["sample.stepz=3"], "did you mean sample.steps"),
    (["sample.steps=abc"], "sample.steps"),
    (["parallel.cfg_degree=3"], "parallel.cfg_degree"),
    (["parallel.ulysses_degree=2"], "torchrun --nproc_per_node 2"),
    (["model.path=/nonexistent/Wan2.1-T2V-1.3B"], "is not a directory"),
    (["output.path=/proc/lightx2v_sp/video.mp4"], "not writable"),
    (["output.path=/tmp/video.avi"], "must end with .mp4"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--config", "/nonexistent/config.yaml"], "config file not found"),
    (["--config", ROOT], "is a directory; give a YAML file"),
])
def test_bad_input_is_one_error_line(cache, tmp_path, args, expect):
    r = _generate(cache, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_broken_yaml_is_one_error_line(cache, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("sample: {steps: 3\nprompt: x\n")
    r = _generate(cache, "--config", str(broken))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = _error_lines(r.stderr)
    assert f"config file {broken} is not valid YAML" in line and "line " in line, line


def test_incomplete_model_dir(cache, tmp_path):
    broken = tmp_path / "Wan2.1-T2V-1.3B"
    broken.mkdir()
    shutil.copy(os.path.join(tiny.tiny_model_dir(cache), "config.json"), broken / "config.json")
    out = tmp_path / "x.mp4"
    r = _generate(cache, f"model.path={broken}", f"output.path={out}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = _error_lines(r.stderr)
    assert "incomplete" in line and "DiT weights" in line and "Wan2.1_VAE.pth" in line and str(broken) in line
    assert not out.exists()


def test_help_config_lists_keys(cache):
    r = subprocess.run([sys.executable, "-m", "lightx2v_sp.generate", "--help-config"], cwd=ROOT,
                       env=_env(cache), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "parallel.ulysses_degree" in r.stdout and "output.path" in r.stdout
    big = os.path.join(ROOT, "configs", "wan_t2v_14b_720p_4090x8_offload.yaml")
    r = subprocess.run([sys.executable, "-m", "lightx2v_sp.generate", "--config", big, "--help-config",
                        "sample.steps=7"], cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=60)
    values = {line.split(" = ")[0]: line.split(" = ")[1] for line in r.stdout.splitlines() if " = " in line}
    assert r.returncode == 0 and values["sample.steps"].startswith("7 (schema default 50)"), r.stdout
    assert values["parallel.a2a"].startswith("'round_robin'") and values["offload.dit"].startswith("'block'")
    assert values["sample.height"].startswith("720 (schema default 480)")


def test_torchrun_layout_errors_exit_every_rank(cache, tmp_path):
    """2 ranks: degrees that do not multiply to 2, then a DiT whose 3 heads do not split over 2."""
    out = tmp_path / "bad.mp4"
    r = _torchrun(cache, "parallel.ulysses_degree=1", f"output.path={out}")
    assert r.returncode != 0
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "1 x 1 = 1 but the world size is 2" in lines[0], r.stderr
    assert "cfg_degree=2 x ulysses_degree=1" in lines[0]  # the layouts that would fit
    # torchrun's report lists every rank as failed: rank 0 with our user-error status 2, rank 1 with
    # 2 as well, or SIGTERM (-15) when torchrun's teardown reached it first
    codes = re.findall(r"exitcode\s+:\s*(-?\d+)", r.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, r.stderr[-3000:]

    three = tmp_path / "three-heads"
    shutil.copytree(tiny.tiny_model_dir(cache), three)
    from lightx2v_sp.models.wan import WanConfig, WanModel

    WanModel(WanConfig(**{**tiny.TINY_WAN, "dim": 48, "num_heads": 3})).save_pretrained(three, layout="official")
    r = _torchrun(cache, f"model.path={three}", "parallel.ulysses_degree=2", f"output.path={out}")
    assert r.returncode != 0
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "3 attention heads cannot be split over a Ulysses group of 2 (parallel.ulysses_degree=2)" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_log_lines_do_not_share_the_progress_bar_line(monkeypatch):
    import io
    import logging

    from tqdm import tqdm

    from lightx2v_sp import generate

    log = logging.getLogger("lightx2v_sp")
    saved = (log.handlers[:], log.level, log.propagate)
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    try:
        generate._setup_logging(0)
        for i in tqdm(range(3), desc="denoise", file=buf, ncols=60, mininterval=0):
            if i == 1:
                log.info("attention backend auto -> sdpa")
    finally:
        log.handlers[:], log.level, log.propagate = saved
    lines = buf.getvalue().replace("\r", "\n").splitlines()
    assert "[lightx2v_sp] attention backend auto -> sdpa" in lines, lines  # a line of its own
    assert any(line.startswith("denoise: 100%") for line in lines)


def test_exit_with_stdout_closed_keeps_the_status():
    # generate leaves with os._exit after flushing (generate.exit_now); a process started without a
    # stdout (sys.stdout is None then) must still exit with the run's status, not a traceback's
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "lightx2v_sp.generate", "--config", CONFIG, "--plan"], cwd=ROOT,
                          env=env, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


FAST_EXIT_PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("interpreter teardown", flush=True))  # os._exit skips atexit handlers
sys.argv = ["generate", "--config", sys.argv[1], "output.path=" + sys.argv[2]]
runpy.run_module("lightx2v_sp.generate", run_name="__main__")
"""


def test_a_finished_run_leaves_without_the_interpreters_teardown(tmp_path):
    # a whole run (its imports include torch._dynamo, which imports cProfile: loaded is not active)
    # ends in os._exit once the outputs are written; LIGHTX2V_SP_FAST_EXIT=0 exits normally
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for fast, name in (("1", "fast.mp4"), ("0", "slow.mp4")):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-c", FAST_EXIT_PROBE, CONFIG, str(out)], cwd=ROOT,
                              env=dict(env, LIGHTX2V_SP_FAST_EXIT=fast), capture_output=True, text=True)
        assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
        assert ("interpreter teardown" in proc.stdout) == (fast == "0"), (fast, proc.stdout[-500:])


def test_a_profiler_still_gets_its_results(tmp_path):
    # the fast exit skips the interpreter's teardown, where cProfile (and coverage tools) write their
    # results: with one of them loaded, generate exits normally
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    prof = tmp_path / "run.prof"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "lightx2v_sp.generate",
                           "--config", CONFIG, "--plan"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert prof.is_file() and prof.stat().st_size > 0
