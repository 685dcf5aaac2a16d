"""The server over real HTTP: one process on CPU with the tiny model, an API key, a queue of 4.

One server serves every test of this module (it loads once, as a user's would); the last test
stops it with SIGTERM while a job runs. The served mp4 is compared byte for byte with the file
`run` (what `generate` calls) writes for the same settings: both start from the same latents
(seed), encode the same prompt pair as one batch (prompt_cache.py), run the same code on the CPU,
so the frames are the same bits, and libx264 (deterministic for the same frames and settings)
and the mp4 muxer (no time stamps) turn them into the same bytes.
"""
import base64
import os
import re
import shutil
import tempfile
import time

import pytest
import torch
from serve_helpers import CONFIG, KEY, Server, env_for, multipart, png_bytes, request, wait_for

from lightx2v_sp.config import load_config
from lightx2v_sp.models import tiny

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
PROMPT = "${oc.env:HOME}: it's a cat #1 \u2013 \u00abn\u00efce\u00bb {x} \\n"  # text, byte for byte
MAX_BODY = 65536


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    tiny.ensure_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(cache, out_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    srv = Server(log, ["sample.steps=2", f"serve.output_dir={out_dir}", "serve.queue_size=4",
                       f"serve.max_request_bytes={MAX_BODY}"], env_for(cache, LIGHTX2V_SP_API_KEY=KEY))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _post(server, body, **kw):
    return request(f"{server.url}/v1/videos", "POST", body, **kw)


def test_submit_poll_download_equals_generate(server, cache, tmp_path, monkeypatch):
    from lightx2v_sp.pipeline import run

    body = {"prompt": PROMPT, "negative_prompt": "grey", "seed": 7, "steps": 2, "size": "64x64", "num_frames": 9}
    status, job, _ = _post(server, body)
    assert status == 200 and job["status"] == "queued" and JOB_ID.match(job["id"]), job
    done = wait_for(server.url, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["step"] == done["steps"] == 2, done
    status, mp4, headers = request(f"{server.url}/v1/videos/{job['id']}/content")
    assert status == 200 and headers["content-type"] == "video/mp4" and len(mp4) > 1000

    monkeypatch.setenv("LIGHTX2V_SP_CACHE", cache)
    ref = tmp_path / "ref.mp4"
    cfg = load_config(CONFIG, [f"prompt={PROMPT}", "negative_prompt=grey", "seed=7", "sample.steps=2",
                               f"output.path={ref}", "parallel.ulysses_degree=1"])
    run(cfg, torch.device("cpu"), progress=False)
    assert mp4 == ref.read_bytes()

    # the same prompt pair again: no load, no text encoding (the cached contexts), the prompt kept byte for byte
    status, job2, _ = _post(server, {**body, "seed": 8})
    done2 = wait_for(server.url, job2["id"])
    assert done2["status"] == "completed", done2
    status, summary, _ = request(f"{server.url}/v1/videos/{job2['id']}/summary")
    assert status == 200 and summary["config"]["prompt"] == PROMPT and summary["config"]["seed"] == 8
    assert summary["text"]["prompt_cache"] == "hit"
    assert set(summary["stage_times_s"]) == {"denoise", "decode", "write"}  # no preflight, load or text
    assert done2["timings"]["to_first_step_s"] >= 0 and done2["timings"]["run_s"] > 0


def test_bad_requests_get_the_cli_message(server, out_dir):
    for fields, overrides in [({"num_frames": 10}, ["sample.num_frames=10"]),
                              ({"size": "64x60"}, ["sample.width=64", "sample.height=60"]),
                              ({"steps": 0}, ["sample.steps=0"]),
                              ({"seed": -1 - 2 ** 63}, [f"seed={-1 - 2 ** 63}"])]:
        status, err, _ = _post(server, {"prompt": "a cat", **fields})
        with pytest.raises(ValueError) as cli:
            load_config(CONFIG, ["sample.steps=2", *overrides])
        assert status == 400 and err["error"]["message"] == str(cli.value), (fields, err)

    image = base64.b64encode(png_bytes()).decode()
    status, err, _ = _post(server, {"prompt": "a cat", "image": image})
    message = err["error"]["message"]
    assert status == 400 and "is text-to-video" in message and "<the uploaded image>" in message, err
    assert out_dir not in message  # the server's own paths stay inside
    for body, expect in [({"prompt": "a", "stpes": 3}, "did you mean steps"),
                         ({"negative_prompt": "x"}, "prompt is required"),
                         ({"prompt": "a", "steps": "3"}, "steps must be an integer"),
                         ({"prompt": "a", "guidance_scale": True}, "guidance_scale must be a number"),
                         ({"prompt": "a", "size": "64*64"}, "WIDTHxHEIGHT"),
                         ({"prompt": "a", "size": "128x128"}, "larger than the 64x64"),
                         ({"prompt": "a", "seconds": "2", "num_frames": 9}, "not both"),
                         ({"prompt": "a", "image": "not base64!"}, "not valid base64")]:
        status, err, _ = _post(server, body)
        assert status == 400 and expect in err["error"]["message"], (body, err)
    status, err, _ = _post(server, b"{not json", content_type="application/json")
    assert status == 400 and "not JSON" in err["error"]["message"]
    data, ctype = multipart({"prompt": "a", "steps": "abc"}, {})
    status, err, _ = _post(server, data, content_type=ctype)
    assert status == 400 and "steps = 'abc' is not an integer" in err["error"]["message"], err
    status, err, _ = _post(server, {"prompt": "x" * MAX_BODY})
    assert status == 413, err
    assert os.listdir(os.path.join(out_dir, "uploads")) == []  # refused uploads are removed


def test_keys_and_unknown_ids(server):
    for key in (None, "wrong"):
        status, err, headers = request(f"{server.url}/v1/videos", key=key)
        assert status == 401 and "API key" in err["error"]["message"] and headers["www-authenticate"] == "Bearer"
        assert _post(server, {"prompt": "a"}, key=key)[0] == 401
    assert request(f"{server.url}/health", key=None)[0] == 200
    status, page, _ = request(f"{server.url}/", key=None)
    assert status == 200 and b"<form" in page and not re.search(rb"(https?:)?//[a-z]", page)  # nothing remote
    for path in ("/v1/videos/video_" + "0" * 32, "/v1/videos/../../etc/passwd", "/v1/videos/x/content",
                 "/v1/videos/video_" + "0" * 32 + "/content"):
        assert request(f"{server.url}{path}")[0] == 404, path
    assert request(f"{server.url}/v1/videos/video_{'0' * 32}", "DELETE")[0] == 404


def test_cancel_queued_and_running(server, out_dir):
    status, long_job, _ = _post(server, {"prompt": "long", "steps": 1000})
    assert status == 200
    wait_for(server.url, long_job["id"], statuses=("in_progress",), step=1)
    status, queued, _ = _post(server, {"prompt": "queued"})
    assert status == 200 and queued["status"] == "queued"
    status, out, _ = request(f"{server.url}/v1/videos/{queued['id']}", "DELETE")
    assert status == 200 and out["status"] == "failed" and out["error"]["code"] == "cancelled", out
    request(f"{server.url}/v1/videos/{long_job['id']}", "DELETE")
    stopped = wait_for(server.url, long_job["id"], statuses=("failed",))
    assert stopped["error"]["code"] == "cancelled" and stopped["step"] < 1000, stopped
    for job in (long_job, queued):
        assert not [n for n in os.listdir(out_dir) if job["id"] in n]  # no video, no summary, no temp file

    # a finished job: DELETE forgets it and removes its files
    status, job, _ = _post(server, {"prompt": "short", "steps": 1})
    wait_for(server.url, job["id"], statuses=("completed",))
    assert os.path.exists(os.path.join(out_dir, f"{job['id']}.mp4"))
    status, out, _ = request(f"{server.url}/v1/videos/{job['id']}", "DELETE")
    assert status == 200 and out == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert request(f"{server.url}/v1/videos/{job['id']}")[0] == 404
    assert not [n for n in os.listdir(out_dir) if job["id"] in n]


def test_a_failing_job_fails_alone(server):
    # finite in the request (float64), inf in the fp32 guidance arithmetic: NaN latents at step 1
    status, bad, _ = _post(server, {"prompt": "overflow", "guidance_scale": 1e300})
    assert status == 200
    failed = wait_for(server.url, bad["id"], statuses=("failed",))
    assert failed["error"]["code"] == "job_failed" and "NaN or inf" in failed["error"]["message"], failed
    status, good, _ = _post(server, {"prompt": "overflow", "steps": 1})
    assert wait_for(server.url, good["id"])["status"] == "completed"


def test_queue_of_four_refuses_with_429_and_loses_nothing(server, out_dir):
    completed_before = request(f"{server.url}/health", key=None)[1]["jobs"]["completed"]
    accepted, refused = {}, 0
    for i in range(30):
        status, job, _ = _post(server, {"prompt": "queue", "seed": 1000 + i, "steps": 1})
        if status == 200:
            accepted[job["id"]] = 1000 + i
        else:
            assert status == 429 and job["error"]["code"] == "queue_full", job
            refused += 1
    assert len(accepted) + refused == 30 and refused > 0 and len(accepted) >= 5  # 4 queued + 1 running
    for job_id, seed in accepted.items():
        assert wait_for(server.url, job_id)["status"] == "completed"
        status, summary, _ = request(f"{server.url}/v1/videos/{job_id}/summary")
        assert summary["config"]["seed"] == seed and summary["output_path"].endswith(f"{job_id}.mp4")
    health = request(f"{server.url}/health", key=None)[1]
    assert health["jobs"]["completed"] == completed_before + len(accepted)  # each accepted job ran once
    assert health["queued"] == 0 and health["running"] is None
    log = server.text()
    for job_id in accepted:
        assert log.count(f"wrote {os.path.join(out_dir, job_id)}.mp4") == 1


def _chromium():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no chromium + chromedriver (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_page_makes_a_video_that_plays(server, tmp_path):
    from selenium.webdriver.common.by import By

    browser = _chromium()
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        deadline = time.monotonic() + 30
        while browser.find_element(By.ID, "steps").get_attribute("value") == "" and time.monotonic() < deadline:
            time.sleep(0.1)  # the defaults arrive from /v1/models
        browser.find_element(By.ID, "prompt").send_keys("a red fox in the snow")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("1")
        browser.find_element(By.ID, "submit").click()
        state, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:
            state = browser.execute_script(
                "const card = [...document.querySelectorAll('.job')].find(c => "
                "  c.querySelector('.prompt').textContent === 'a red fox in the snow');"
                "const v = card && card.querySelector('video.result');"
                "return v ? {id: card.id, ready: v.readyState, duration: v.duration, time: v.currentTime,"
                "            error: v.error && v.error.code, paused: v.paused} : null")
            if state and state["ready"] >= 2 and state["time"] > 0:
                break
            if state and state["paused"]:  # autoplay is the browser's call: ask it to play
                browser.execute_script("document.getElementById(arguments[0]).querySelector('video').play()",
                                       state["id"])
            time.sleep(0.2)
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert state and state["error"] is None and state["duration"] > 0 and state["time"] > 0, state
        assert request(f"{server.url}/v1/videos/{state['id']}")[1]["status"] == "completed"
        assert (tmp_path / "page.png").stat().st_size > 1000
    finally:
        browser.quit()


def test_sigterm_stops_the_running_job_and_leaves_no_file(server, out_dir):
    job = _post(server, {"prompt": "long", "steps": 1000})[1]
    wait_for(server.url, job["id"], statuses=("in_progress",), step=1)
    assert server.stop() == 0, server.text()[-2000:]
    log = server.text()
    assert f"{job['id']} failed: {job['id']}: cancelled: the server is stopping" in log, log[-2000:]
    assert "stopped (SIGTERM)" in log, log[-2000:]
    names = os.listdir(out_dir)
    assert not [n for n in names if job["id"] in n] and not [n for n in names if n.startswith(".")], names
