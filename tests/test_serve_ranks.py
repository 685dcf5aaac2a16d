"""Load once on 2 gloo ranks (torchrun, ulysses 2): a prompt file, then the server, on the tiny Wan2.1 I2V model.

The I2V model exercises what differs between ranks: rank 0 alone reads and encodes the image and
broadcasts it. The served video (its image uploaded as a multipart file) is compared byte for byte
with the one `generate --prompts` wrote for the same settings on the same layout: same latents,
same image pixels, same code on the same layout, so the same frames, and libx264 makes the same
bytes of them (see test_serve_http.py). Cancelling and a failing job must leave both ranks in step:
the job after them runs collectives that would time out otherwise. A hung rank ends the server.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from serve_helpers import ROOT, Server, env_for, multipart, request, wait_for

from lightx2v_sp.models import tiny
from lightx2v_sp.testing import free_port

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CONFIG = os.path.join(ROOT, "configs", "wan21_i2v_tiny.yaml")
IMAGE = os.path.join(ROOT, "assets", "images", "tiny_first_frame.png")
PROMPT = "a tiny cat \u00e0 la plage"
TIMEOUT_S = 10  # comm.timeout_s of the server: how long a silent rank is waited for


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    tiny.ensure_tiny_model(path, "wan2.1-i2v")
    return path


@pytest.fixture(scope="module")
def batch(cache, tmp_path_factory):
    """`generate --prompts` under torchrun: item 1 good, item 2 an image that does not exist, item 3 good."""
    tmp = tmp_path_factory.mktemp("batch")
    items = [{"prompt": PROMPT, "seed": 5, "steps": 2},
             {"prompt": "no image", "image": str(tmp / "missing.png")},
             {"prompt": "dog", "seed": 6, "steps": 1, "output": str(tmp / "dog.mp4")}]
    (tmp / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lightx2v_sp.generate", "--config", CONFIG, "--prompts", str(tmp / "items.jsonl"),
           f"output.path={tmp / 'v.mp4'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env_for(cache), capture_output=True, text=True, timeout=300)
    return tmp, r


def test_prompt_file_on_two_ranks(batch):
    tmp, r = batch
    assert r.returncode != 0, r.stderr  # an item failed: the batch says so in its status
    errors = [line for line in r.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert errors == [f"error: items.jsonl line 2: image={tmp / 'missing.png'} does not exist; image-to-video "
                      "needs its first frame"], r.stderr[-3000:]
    assert "items.jsonl: 2 made, 0 skipped (made before), 1 failed" in r.stderr
    assert sorted(os.listdir(tmp)) == ["dog.json", "dog.mp4", "items.jsonl", "v_0001.json", "v_0001.mp4"]
    summary = json.loads((tmp / "v_0001.json").read_text())
    assert summary["layout"]["world_size"] == 2 and summary["layout"]["ulysses_degree"] == 2
    assert summary["config"]["prompt"] == PROMPT and summary["config"]["seed"] == 5


@pytest.fixture(scope="module")
def server(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    srv = Server(str(out / "server.log"), [f"serve.output_dir={out / 'videos'}", f"comm.timeout_s={TIMEOUT_S}"],
                 env_for(cache), nproc=2, config=CONFIG)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_served_equals_generate_on_two_ranks(server, batch):
    tmp, _ = batch
    with open(IMAGE, "rb") as f:
        body, ctype = multipart({"prompt": PROMPT, "seed": "5", "steps": "2"}, {"image": ("cat.png", f.read())})
    status, job, _ = request(f"{server.url}/v1/videos", "POST", body, key=None, content_type=ctype)
    assert status == 200 and job["image"] is True, job
    assert wait_for(server.url, job["id"], timeout=180, key=None)["status"] == "completed"
    status, mp4, _ = request(f"{server.url}/v1/videos/{job['id']}/content", key=None)
    assert status == 200 and mp4 == (tmp / "v_0001.mp4").read_bytes()

    status, err, _ = request(f"{server.url}/v1/videos", "POST", {"prompt": "no image"}, key=None)
    assert status == 400 and "is image-to-video (wan2.1-i2v) and needs image=" in err["error"]["message"], err


def test_cancel_and_a_failing_job_keep_the_ranks_in_step(server):
    def post(body):
        with open(IMAGE, "rb") as f:
            data, ctype = multipart(body, {"image": ("cat.png", f.read())})
        status, job, _ = request(f"{server.url}/v1/videos", "POST", data, key=None, content_type=ctype)
        assert status == 200, job
        return job["id"]

    long_job = post({"prompt": "long", "steps": "1000"})
    wait_for(server.url, long_job, statuses=("in_progress",), step=2, key=None)
    request(f"{server.url}/v1/videos/{long_job}", "DELETE", key=None)
    stopped = wait_for(server.url, long_job, statuses=("failed",), key=None)
    assert stopped["error"]["code"] == "cancelled" and stopped["step"] < 1000, stopped
    bad = post({"prompt": "overflow", "guidance_scale": "1e300"})
    assert "NaN or inf" in wait_for(server.url, bad, statuses=("failed",), key=None)["error"]["message"]
    good = post({"prompt": "after", "steps": "1"})
    assert wait_for(server.url, good, timeout=180, key=None)["status"] == "completed"


def test_a_hung_rank_ends_the_server_with_one_error(server):
    """SIGSTOP on rank 1 while idle: its heartbeat stops; after comm.timeout_s rank 0 says so in one line
    and the server is gone (it takes no job it could not run)."""
    assert len(server.ranks) == 2, server.ranks
    os.kill(server.ranks[1], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while "error:" not in server.text() and time.monotonic() < deadline:
            time.sleep(0.2)
        errors = [line for line in server.text().splitlines() if "error:" in line]
        assert len(errors) == 1 and re.fullmatch(rf"\[rank 0\] error: rank 1 sent no heartbeat for \d+s \(comm.timeout_s="
                                                 rf"{TIMEOUT_S}\): it is stopped, hung or dead; no video was written",
                                                 errors[0]), server.text()[-3000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                request(f"{server.url}/health", key=None, timeout=2)
            except OSError:
                break  # refused: nobody listens any more
            time.sleep(0.2)
        else:
            raise AssertionError("the server still answers after its rank 1 was lost")
    finally:
        os.kill(server.ranks[1], signal.SIGCONT)  # its pending SIGTERM from torchrun can act now
    assert server.stop() != 0
