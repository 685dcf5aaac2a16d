"""Load-once parts without HTTP: job fields and their checks, prompt files (made, failed, resumed),
the prompt cache, the job board's queue, and the runner split (load once, then jobs)."""
import logging
import os

import pytest
import torch

from lightx2v_sp.config import load_config
from lightx2v_sp.models import tiny
from lightx2v_sp.pipeline.job import JobCancelled, check_size, job_config, job_overrides
from lightx2v_sp.pipeline.prompt_cache import PromptCache
from lightx2v_sp.serve.batch import ITEM_FIELDS, default_output, read_items, run_prompt_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml")


def _overrides(item, text=False, allowed=ITEM_FIELDS):
    return job_overrides(item, "item", allowed, fps=16, max_prompt_chars=50, text=text)


def test_job_fields_types_and_derived_values():
    assert _overrides({"prompt": "p", "size": "832x480", "seconds": "5", "guidance_scale": 3}) == {
        "prompt": "p", "sample.width": 832, "sample.height": 480, "sample.num_frames": 81,
        "sample.guidance_scale": 3.0}
    assert _overrides({"steps": "12", "seed": "-3"}, text=True) == {"sample.steps": 12, "seed": -3}
    for item, expect in [({"steps": "12"}, "steps must be an integer, got str"),
                         ({"steps": True}, "steps must be an integer, got bool"),
                         ({"steps": 1.5}, "steps must be an integer"),
                         ({"guidance_scale": float("nan")}, "not a finite number"),
                         ({"prompt": 3}, "prompt must be a string"),
                         ({"prompt": "x" * 51}, "51 characters; serve.max_prompt_chars = 50"),
                         ({"num_frame": 9}, "unknown field 'num_frame' (did you mean num_frames?)"),
                         ({"size": "832 x 480"}, "WIDTHxHEIGHT"),
                         ({"seconds": 0}, "must be > 0"),
                         ({"size": "64x64", "width": 64}, "not both")]:
        with pytest.raises(ValueError) as err:
            _overrides(item)
        assert expect in str(err.value)
    with pytest.raises(ValueError, match="unknown field 'output'"):
        _overrides({"output": "/etc/x.mp4"}, allowed=("prompt",))  # what a request may not set
    with pytest.raises(ValueError, match="steps = 'x' is not an integer"):
        _overrides({"steps": "x"}, text=True)


def test_job_config_is_checked_like_a_config():
    base = load_config(CONFIG)
    job = job_config(base, {"prompt": "a dog", "sample.steps": 3})
    assert job.prompt == "a dog" and job.sample.steps == 3 and base.prompt != "a dog" and base.sample.steps == 4
    for key, value in [("sample.num_frames", 10), ("sample.width", 60), ("sample.steps", 0),
                       ("sample.guidance_scale", float("inf"))]:
        with pytest.raises(ValueError) as cli:
            load_config(CONFIG, [f"{key}={value}"])
        with pytest.raises(ValueError) as job_error:
            job_config(base, {key: value})
        assert str(job_error.value) == str(cli.value)  # the CLI's one line, word for word
    check_size(base, job_config(base, {"sample.width": 32}))
    with pytest.raises(ValueError, match="larger than the 64x64, 9 frames"):
        check_size(base, job_config(base, {"sample.num_frames": 13}))


def test_prompt_file_items(tmp_path):
    base = load_config(CONFIG, [f"output.path={tmp_path}/out/v.mp4"])
    text = tmp_path / "p.txt"
    text.write_bytes(b"  a cat ${x} #1  \r\n\n\t\nline three: {\"prompt\": 1}\n")
    items = read_items(str(text), base)
    assert [(label, cfg.prompt, cfg.output.path) for label, cfg, _ in items] == [
        ("p.txt line 1", "  a cat ${x} #1  ", f"{tmp_path}/out/v_0001.mp4"),
        ("p.txt line 4", "line three: {\"prompt\": 1}", f"{tmp_path}/out/v_0004.mp4")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 3, "size": "32x48"}\n{"prompt": "b", "num_frames": 8}\nnot json\n'
                     '["a list"]\n{"seed": 1}\n')
    items = read_items(str(jsonl), base)
    assert items[0][1].seed == 3 and (items[0][1].sample.width, items[0][1].sample.height) == (32, 48)
    assert [error for _, _, error in items[1:]] == [
        "p.jsonl line 2: sample.num_frames = 8 must be 4k+1 (the VAE compresses time by 4), e.g. 5 or 9",
        "p.jsonl line 3: not a JSON object (Expecting value: line 1 column 1 (char 0))",
        "p.jsonl line 4: a job is a JSON object such as {\"prompt\": \"a cat\"}, got list",
        "p.jsonl line 5: no \"prompt\""]
    assert default_output("outputs/tiny.mp4", 12) == "outputs/tiny_0012.mp4"
    (tmp_path / "blank.txt").write_text("\n  \n")
    for path, expect in [(tmp_path / "blank.txt", "holds no prompts"), (tmp_path / "none.txt", "no such file")]:
        with pytest.raises(ValueError, match=expect):
            read_items(str(path), base)


def test_prompt_file_makes_reports_and_resumes(tmp_path, monkeypatch, capsys):
    """3 items, one bad: two videos and one error; the second run skips the two."""
    monkeypatch.setenv("LIGHTX2V_SP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    cfg = load_config(CONFIG, ["sample.steps=1", f"output.path={out}/v.mp4", "parallel.ulysses_degree=1"])
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "a cat", "seed": 1}\n{"prompt": "a cat", "image": "cat.png"}\n'
                     '{"prompt": "a dog", "negative_prompt": "grey", "output": "%s/dog.mp4"}\n' % out)
    assert run_prompt_file(cfg, torch.device("cpu"), str(items)) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: items.jsonl line 2: image=cat.png was given, but the model at "
        f"{tiny.tiny_model_dir(str(tmp_path / 'cache'))} is text-to-video (wan2.1-t2v) and would ignore it; drop "
        "image= or use an I2V model"]
    assert sorted(os.listdir(out)) == ["dog.json", "dog.mp4", "v_0001.json", "v_0001.mp4"]
    made = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}

    messages, handler = [], logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("lightx2v_sp")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        assert run_prompt_file(cfg, torch.device("cpu"), str(items)) == 2  # the bad item is still bad
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert "items.jsonl: 0 made, 2 skipped (made before), 1 failed" in messages
    assert {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)} == made


def test_prompt_cache_keeps_the_last_pairs():
    cache = PromptCache(2)
    cache.put(("a", None), 1)
    cache.put(("b", "n"), 2)
    assert cache.get(("a", None)) == 1  # now the most recent
    cache.put(("c", "n"), 3)
    assert cache.get(("b", "n")) is None and cache.get(("a", None)) == 1 and len(cache) == 2
    cache.put(("a", "n"), 4)  # the pair is the key: another negative prompt is another entry
    assert cache.get(("a", "n")) == 4 and cache.get(("a", None)) == 1 and cache.get(("c", "n")) is None
    off = PromptCache(0)
    off.put(("a", None), 1)
    assert off.get(("a", None)) is None


def test_board_queue_cancel_and_forget():
    from lightx2v_sp.serve.board import JobBoard, NotAccepting, QueueFull, Record
    from lightx2v_sp.serve.loop import Job

    base = load_config(CONFIG)
    board = JobBoard(queue_size=2, keep_jobs=1)

    def record(i):
        return Record(job=Job(f"video_{i:032x}", base, f"job {i}"), request={})

    with pytest.raises(NotAccepting):
        board.submit(record(0))
    board.ready("tiny")
    board.submit(record(1))
    board.submit(record(2))
    with pytest.raises(QueueFull):
        board.submit(record(3))
    assert board.cancel(f"video_{2:032x}")["error"]["code"] == "cancelled"
    job = board.next_job(lambda: None, lambda: None)
    assert job.id == f"video_{1:032x}" and board.get(job.id)["status"] == "in_progress"
    board.step(job, 1, 4)
    assert board.get(job.id)["progress"] == 25 and not board.wants_cancel(job)
    board.cancel(job.id)
    assert board.wants_cancel(job)
    board.finished(job, None, JobCancelled("stopped"))
    assert board.health()["jobs"] == {"completed": 0, "failed": 0, "cancelled": 2}
    assert [j["id"] for j in board.list()] == [job.id]  # keep_jobs=1: the older finished job is forgotten
    board.submit(record(4))
    board.close("stopping", "the server is stopping")
    assert board.get(f"video_{4:032x}")["error"]["code"] == "server_stopped"
    assert board.next_job(lambda: None, lambda: "SIGTERM") is None


def test_run_is_load_then_one_job(tmp_path, monkeypatch):
    """`run` = load_models + run_job; a second job on the same loaded models gives the same video as a
    fresh run of its own settings (nothing of the first job leaks into the second)."""
    from lightx2v_sp.pipeline.runner import Stages, load_models, run, run_job

    monkeypatch.setenv("LIGHTX2V_SP_CACHE", str(tmp_path / "cache"))
    device = torch.device("cpu")
    cfg = load_config(CONFIG, ["sample.steps=2", f"output.path={tmp_path}/a.mp4", "parallel.ulysses_degree=1"])
    loaded = load_models(cfg, device, Stages(device), keep=True, prompt_cache=4)
    first = job_config(cfg, {"prompt": "first", "seed": 1, "sample.guidance_scale": 1.0,
                             "output.path": f"{tmp_path}/1.mp4"})
    second = job_config(cfg, {"prompt": "second", "sample.guidance_scale": 3.0, "sample.steps": 3,
                              "output.path": f"{tmp_path}/2.mp4"})
    for job in (first, second):
        result = run_job(loaded, job, Stages(device), 0.0, job.output.path, progress=False)
    assert loaded.text is not None and len(loaded.prompts) == 2  # the encoder stays loaded; pairs cached
    assert result.summary["denoise"]["dit_forwards"] == 6  # 3 steps, two passes each (guidance)
    fresh = run(job_config(second, {"output.path": f"{tmp_path}/fresh.mp4"}), device, progress=False)
    assert torch.equal(result.latents, fresh.latents)
    assert (tmp_path / "2.mp4").read_bytes() == (tmp_path / "fresh.mp4").read_bytes()
