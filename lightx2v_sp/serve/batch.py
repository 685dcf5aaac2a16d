"""`generate --prompts FILE`: load once, then one video per item of a prompt file.

FILE is JSON Lines when its name ends in .jsonl (one object a line: `prompt` and optionally the
other job fields of pipeline/job.py: negative_prompt, seed, image, output, steps, guidance_scale,
guidance_scale_2, size or width/height, num_frames or seconds), else plain text: every line that
is not blank is one prompt, byte for byte (only the line break is dropped). Every item is the
config with its own fields; without `output` it is written next to output.path as
`<name>_<line>.mp4` (outputs/tiny.mp4 -> outputs/tiny_0003.mp4 for line 3), each with its summary.

A bad item (a field the job cannot take, a size the model cannot make, an image that does not
open) is reported with its line and skipped; the others are made. An item whose output exists
with its summary (a finished item of an earlier run) is skipped, so a killed batch resumes where
it stopped. Rank 0 reads the file and hands every item to all ranks (loop.py), so it works on any
layout under torchrun. The exit status is 0 when every item was made or skipped, else 2.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

import torch

from lightx2v_sp.distributed.groups import job_size_rank
from lightx2v_sp.pipeline.checks import AgreedError, agreed
from lightx2v_sp.pipeline.job import DERIVED, FIELDS, job_config, job_overrides
from lightx2v_sp.pipeline.output import check_ours
from lightx2v_sp.pipeline.runner import RunResult, Stages, load_models

from .loop import Job, JobLoop

log = logging.getLogger("lightx2v_sp")

ITEM_FIELDS = tuple(FIELDS) + DERIVED
EXIT_ITEM_FAILED = 2


def _lines(path: str) -> list[tuple[int, str]]:
    """(line number, text without its line break) of every line that is not blank."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"--prompts {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--prompts {path} is a directory; give a text or .jsonl file") from None
    except OSError as e:
        raise ValueError(f"--prompts {path} could not be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise ValueError(f"--prompts {path} holds no prompts (every line is blank)")
    return lines


def default_output(base_path: str, line: int) -> str:
    stem, ext = os.path.splitext(base_path)
    return f"{stem}_{line:04d}{ext}"


def read_items(path: str, base) -> list[tuple[str, Optional[object], Optional[str]]]:
    """(label, the item's checked config or None, its error or None) per item of the file."""
    jsonl = path.lower().endswith(".jsonl")
    items = []
    for line, text in _lines(path):
        label = f"{os.path.basename(path)} line {line}"
        try:
            if jsonl:
                try:
                    item = json.loads(text)
                except ValueError as e:
                    raise ValueError(f"{label}: not a JSON object ({e})") from None
                if isinstance(item, dict) and "prompt" not in item:
                    raise ValueError(f"{label}: no \"prompt\"")
            else:
                item = {"prompt": text}
            overrides = job_overrides(item, label, ITEM_FIELDS, base.sample.fps, base.serve.max_prompt_chars)
            overrides.setdefault("output.path", default_output(base.output.path, line))
            items.append((label, job_config(base, overrides), None))
        except ValueError as e:
            msg = str(e)
            items.append((label, None, msg if msg.startswith(label) else f"{label}: {msg}"))
    return items


def finished_before(path: str) -> bool:
    """The video at `path` and its summary are there, written by this tool: a finished item."""
    if not os.path.isfile(path):
        return False
    try:
        check_ours(path)
    except ValueError:
        return False
    return os.path.isfile(os.path.splitext(path)[0] + ".json")


class _Report:
    """Rank 0: one line per item as it ends, the counts at the end."""

    def __init__(self):
        self.made, self.skipped, self.failed = [], [], []

    def fail(self, label: str, message: str) -> None:
        self.failed.append(label)
        print(f"error: {message}", file=sys.stderr, flush=True)

    def started(self, job: Job) -> None:
        log.info("%s: %s", job.label, job.cfg.output.path)

    def step(self, job: Job, step: int, num_steps: int) -> None:
        pass

    def wants_cancel(self, job: Job) -> bool:
        return False

    def finished(self, job: Job, result: Optional[RunResult], error: Optional[AgreedError]) -> None:
        if error is not None:
            message = str(error)
            self.fail(job.label, message if message.startswith(job.label) else f"{job.label}: {message}")
        else:
            self.made.append(job.label)


def run_prompt_file(cfg, device: torch.device, path: str) -> int:
    """Every rank: load once, make every item of `path`; the exit status (0, or 2 if an item failed)."""
    rank = job_size_rank()[1]
    items = agreed("reading the prompt file", lambda: read_items(path, cfg) if rank == 0 else None)
    loaded = load_models(cfg, device, Stages(device), keep=True, prompt_cache=cfg.serve.prompt_cache)
    loop = JobLoop(loaded, progress=True)
    if rank != 0:
        loop.follow()
        return 0
    report = _Report()
    pending = []
    for label, job_cfg, error in items:
        if error is not None:
            report.fail(label, error)
        elif finished_before(os.path.abspath(job_cfg.output.path)):
            report.skipped.append(label)
            log.info("%s: skipped, %s exists (made by an earlier run)", label, job_cfg.output.path)
        else:
            pending.append(Job(id=label, cfg=job_cfg, label=label))
    queue = iter(pending)
    loop.lead(lambda check: next(queue, None), report)
    log.info("%s: %d made, %d skipped (made before), %d failed", os.path.basename(path), len(report.made),
             len(report.skipped), len(report.failed))
    return EXIT_ITEM_FAILED if report.failed else 0
