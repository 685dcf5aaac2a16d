"""Outputs: never replace a file this tool did not write; temp files go on SIGTERM and after SIGKILL."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lightx2v_sp.pipeline import output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours(tmp_path, name="v"):
    """A video and the summary a run of ours leaves."""
    video = tmp_path / f"{name}.mp4"
    video.write_bytes(b"old video")
    output.write_summary({"stage_times_s": {}}, str(video))
    return video


def test_own_outputs_may_be_replaced(tmp_path):
    video = _ours(tmp_path)
    assert json.loads((tmp_path / "v.json").read_text())["lightx2v_sp_summary"] == 1
    assert output.check_writable(str(video)) == str(video)


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: (d / "v.mp4").write_bytes(b"someone's video"), "v.mp4 exists and lightx2v_sp did not write it"),
    (lambda d: (d / "v.json").write_text('{"name": "a model config"}'), "v.json, which lightx2v_sp did not write"),
    (lambda d: (d / "v.json").write_bytes(b"\x00\xff not json"), "v.json, which lightx2v_sp did not write"),
    (lambda d: (d / "v.json").mkdir(), "v.json, which is a directory"),
    # our summary, but it names another video: v.mp4 is someone else's
    (lambda d: (output.write_summary({}, str(d / "w.mp4")), os.rename(d / "w.json", d / "v.json"),
                (d / "v.mp4").write_bytes(b"x")), "v.mp4 exists and lightx2v_sp did not write it"),
])
def test_foreign_files_are_never_replaced(tmp_path, setup, fragment):
    setup(tmp_path)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()}
    with pytest.raises(ValueError) as err:
        output.check_writable(str(tmp_path / "v.mp4"))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert "lightx2v_sp_summary" in str(err.value) or "directory" in str(err.value)  # the rule is stated
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()} == before


def test_model_config_is_not_clobbered(tmp_path):
    (tmp_path / "config.json").write_text('{"dim": 96, "num_heads": 6}')
    with pytest.raises(ValueError, match="config.json, which lightx2v_sp did not write"):
        output.check_writable(str(tmp_path / "config.mp4"))


def test_temp_names_carry_the_pid(tmp_path):
    tmp = output._tmp_sibling(str(tmp_path / "v.mp4"))
    assert os.path.basename(tmp).startswith(f".v.{os.getpid()}.") and tmp.endswith(".tmp.mp4")


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = {
        f".v.{dead_pid}.abcdefgh.tmp.mp4": False,      # killed writer: removed
        f".v.{dead_pid}.abcdefgh.tmp.json": False,     # its summary temp: removed
        f".v.{os.getpid()}.abcdefgh.tmp.mp4": True,    # a live writer (this process): kept
        ".v.abcdefgh.tmp.mp4": True,                   # no pid (older versions) and recent: kept
        ".v.zyxwvuts.tmp.mp4": False,                  # no pid and older than a day: removed
        f".w.{dead_pid}.abcdefgh.tmp.mp4": True,       # another output's temp: not ours to judge
        f"v.{dead_pid}.abcdefgh.tmp.mp4": True,        # not hidden: not our pattern
        "notes.txt": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"")
    day_ago = time.time() - output.STALE_TEMP_S - 60
    os.utime(tmp_path / ".v.zyxwvuts.tmp.mp4", (day_ago, day_ago))
    output.check_writable(str(tmp_path / "v.mp4"))
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


_SLOW_WRITE = """
import sys, time
from lightx2v_sp.pipeline import output
from lightx2v_sp.signals import Terminated, terminate_raises
def write(tmp):
    open(tmp, "wb").write(b"partial")
    print("writing", flush=True)
    time.sleep(60)
try:
    with terminate_raises():
        output._atomic(sys.argv[1], write)
except Terminated as e:
    print(f"error: interrupted by {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
"""


def test_sigterm_during_write_removes_the_temp_file(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(tmp_path / "v.mp4")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert len(list(tmp_path.glob(".v.*.tmp.mp4"))) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "error: interrupted by SIGTERM" in err
    assert os.listdir(tmp_path) == []


def test_sigterm_during_a_run_is_one_error_line(tmp_path):
    from lightx2v_sp.models import tiny

    cache = str(tmp_path / "cache")
    tiny.ensure_tiny_model(cache)
    out = tmp_path / "out" / "v.mp4"
    env = dict(os.environ, LIGHTX2V_SP_CACHE=cache, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "lightx2v_sp.generate", "--config", config, "sample.steps=1000",
                             f"output.path={out}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    try:
        while not re.search(rb"denoise:[^\r\n]*\| *[1-9]\d*/1000", seen):  # mid-denoise: a step is done
            chunk = proc.stderr.read1(4096)
            assert chunk, seen.decode(errors="replace")[-2000:]
            seen += chunk
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    lines = [line for line in (seen + rest).decode(errors="replace").replace("\r", "\n").splitlines()
             if "error:" in line]
    assert proc.returncode == 143 and lines == ["error: interrupted by SIGTERM; no video was written"], lines
    assert "Traceback" not in rest.decode(errors="replace")
    assert os.listdir(out.parent) == []


def test_a_failure_between_video_and_summary_keeps_the_previous_pair(tmp_path, monkeypatch):
    """The summary is built after the video is encoded (to time the write): a failure there, or in the
    renames, must leave the previous run's video and summary together, never its JSON beside a new video."""
    import torch

    from lightx2v_sp.config import load_config
    from lightx2v_sp.pipeline import AgreedError, runner

    out = tmp_path / "v.mp4"
    config = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml")
    base = ["sample.steps=1", "parallel.ulysses_degree=1", f"output.path={out}"]
    runner.run(load_config(config, base), torch.device("cpu"), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["v.json", "v.mp4"]

    def failing_plan(*args, **kwargs):
        raise RuntimeError("planted failure after the video was written")

    monkeypatch.setattr(runner, "plan_summary", failing_plan)
    with pytest.raises(AgreedError, match="planted failure"):
        runner.run(load_config(config, base + ["seed=7"]), torch.device("cpu"), progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("previous", [True, False])
def test_output_pair_rolls_back_when_the_video_rename_fails(tmp_path, monkeypatch, previous):
    """Renames: the summary goes first and is put back (or removed) if the video's rename fails."""
    import numpy as np

    video = tmp_path / "v.mp4"
    if previous:
        _ours(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(video):
            raise OSError("planted: disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="planted"):
        with output.OutputPair(str(video)) as pair:
            pair.stage_video(np.zeros((1, 16, 16, 3), dtype=np.uint8), fps=8)
            pair.commit({"stage_times_s": {"new": 1}})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # temporary files gone too
    monkeypatch.setattr(os, "replace", real_replace)
    with output.OutputPair(str(video)) as pair:
        pair.stage_video(np.zeros((1, 16, 16, 3), dtype=np.uint8), fps=8)
        pair.commit({"stage_times_s": {"new": 1}})
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mp4"] and video.read_bytes() != b"old video"
    assert json.loads((tmp_path / "v.json").read_text())["stage_times_s"] == {"new": 1}


def test_a_second_signal_while_the_encoder_stops_still_removes_the_temp_file(tmp_path, monkeypatch):
    # the run failed with frames queued for a slow encoder; OutputPair waits for it to stop, and a second
    # Ctrl-C in that wait must not leave the temporary mp4 behind
    import threading

    import numpy as np

    from lightx2v_sp.pipeline import video_stream

    real = video_stream.open_writer

    def slow_writer(path, fps, quality):
        w = real(path, fps, quality)
        append = w.append_data
        w.append_data = lambda frame: (time.sleep(0.5), append(frame))
        return w

    monkeypatch.setattr(video_stream, "open_writer", slow_writer)
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(KeyboardInterrupt):
        with output.OutputPair(str(tmp_path / "v.mp4")) as out:
            stream = out.open_video(fps=8)
            for _ in range(3):
                stream.put(frames)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # lands during __exit__
            raise KeyboardInterrupt("the first Ctrl-C")
    deadline = time.monotonic() + 20  # the encoder thread finishes its frame after the wait was cut short
    while any(t.name == "lightx2v_sp-mp4" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.listdir(tmp_path) == []
