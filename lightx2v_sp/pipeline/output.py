"""Writing results: the mp4 and its JSON summary, each atomically (temporary file + rename).

A reader never sees a half-written video: the frames go to a hidden temporary file in the same
directory (so the rename stays on one filesystem), which replaces the target only once complete;
any failure (SIGINT and SIGTERM included: they raise) removes the temporary file. The video and its
summary are committed together (`OutputPair`), so a failure never pairs one run's summary with
another run's video. `check_writable` runs before the expensive work so an unwritable path fails in
seconds, not after the denoising.

Never replace a file this tool did not write. Ours are recognised by the summary: the JSON next to
the video carries `"lightx2v_sp_summary": 1` and the video's name. So the summary path may be
replaced only if it holds such a summary, and an existing video only if that summary names it.
A temporary file's name carries its writer's pid (`.<name>.<pid>.XXXXXXXX.tmp.mp4`), so a later
run can remove those left by a killed writer (pid gone, or older than a day) and no other file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from typing import Any

from .video_stream import VideoStream, encode_video


SUMMARY_MARKER = "lightx2v_sp_summary"
STALE_TEMP_S = 24 * 3600  # a temp file this old is stale even if a process with its pid exists (pid reuse)
_MAX_SUMMARY_BYTES = 16 << 20  # ours are a few kB: a bigger file is not one

log = logging.getLogger("lightx2v_sp")


def summary_path(video_path: str) -> str:
    return os.path.splitext(video_path)[0] + ".json"


def _our_summary(path: str) -> dict | None:
    """The summary at `path` if this tool wrote it, else None."""
    try:
        if os.path.getsize(path) > _MAX_SUMMARY_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get(SUMMARY_MARKER) == 1 else None


def check_ours(path: str) -> None:
    """ValueError unless the video `path` and its summary are absent or written by a run of this tool."""
    summary = summary_path(path)
    rule = (f"(a run's own outputs are recognised by the summary next to the video, which carries "
            f"\"{SUMMARY_MARKER}\": 1 and the video's name); remove it or choose another output.path")
    if os.path.isdir(summary):
        raise ValueError(f"output.path = {path}: the summary would go to {summary}, which is a directory; "
                         "choose another output.path")
    ours = _our_summary(summary) if os.path.lexists(summary) else None
    if os.path.lexists(summary) and ours is None:
        raise ValueError(f"output.path = {path}: the summary would replace {summary}, which lightx2v_sp did not "
                         f"write {rule}")
    if os.path.lexists(path) and (ours is None or os.path.basename(str(ours.get("output_path", "")))
                                  != os.path.basename(path)):
        raise ValueError(f"output.path = {path} exists and lightx2v_sp did not write it; the run would replace "
                         f"it {rule}")


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Remove our temporary siblings of `path` left by killed writers; the removed paths."""
    parent = os.path.dirname(path)
    removed = []
    for target in (path, summary_path(path)):
        base, ext = os.path.splitext(os.path.basename(target))
        pattern = re.compile(rf"\.{re.escape(base)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp{re.escape(ext)}")
        try:
            names = os.listdir(parent)
        except OSError:
            return removed
        for name in names:
            m = pattern.fullmatch(name)
            if m is None:
                continue
            tmp = os.path.join(parent, name)
            try:
                old = time.time() - os.lstat(tmp).st_mtime > STALE_TEMP_S
                # no pid in the name: written before pids were, so only its age tells
                if old or (m.group(1) is not None and not _writer_alive(int(m.group(1)))):
                    os.remove(tmp)
                    removed.append(tmp)
            except OSError:
                continue
    if removed:
        log.info("removed %d stale temporary file(s) of killed runs: %s", len(removed), ", ".join(removed))
    return removed


def check_parent_writable(path: str, key: str, consequence: str) -> None:
    """ValueError unless a file can be created in the directory of `path` (made if missing)."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-", delete=True):
            pass
    except OSError as e:
        raise ValueError(f"{key} = {path} is not writable ({e.strerror or e}); {consequence}") from None


def check_writable(path: str) -> str:
    """Absolute output path after checking that a file can be created there (ValueError if not)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"output.path = {path} is a directory; give a file name such as {path}/video.mp4")
    if not path.lower().endswith(".mp4"):
        raise ValueError(f"output.path = {path} must end with .mp4; the video is written as H.264 mp4")
    check_parent_writable(path, "output.path", "no video could be saved, so the run was not started")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"output.path = {path} exists and is read-only; it could not be replaced")
    check_ours(path)
    remove_stale_temps(path)
    return path


def check_video_writer() -> None:
    """ffmpeg is there (imageio-ffmpeg ships one): checked up front, not after the denoising."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise ValueError(f"no ffmpeg to write the mp4 ({e}); pip install imageio-ffmpeg "
                         "(or set IMAGEIO_FFMPEG_EXE to an ffmpeg binary)") from None


def _tmp_sibling(path: str) -> str:
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=f".tmp{ext}", dir=os.path.dirname(path))
    os.close(fd)
    return tmp


def _atomic(path: str, write) -> None:
    tmp = _tmp_sibling(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt and SIGTERM (signals.py) too
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_video(frames, path: str, fps: int, quality: int = 8) -> None:
    """frames [F, H, W, 3] uint8 (tensor or array) -> H.264 mp4 at `path`, atomically."""
    _atomic(path, lambda tmp: encode_video(frames, tmp, fps, quality))


def _dump_json(data: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def write_json(data: dict[str, Any], path: str) -> None:
    _atomic(path, lambda tmp: _dump_json(data, tmp))


def _mark(summary: dict[str, Any], video_path: str) -> dict[str, Any]:
    summary[SUMMARY_MARKER] = 1
    summary["output_path"] = video_path
    return summary


def write_summary(summary: dict[str, Any], video_path: str) -> None:
    """The run's summary next to its video, marked as ours (see `check_ours`)."""
    write_json(_mark(summary, video_path), summary_path(video_path))


class OutputPair:
    """A run's video and its summary, replaced as one: neither is renamed into place before both are
    complete, so a failure in between (the summary is built after the video is encoded, to time the
    write) leaves the previous run's pair as it was, never its summary beside a new video.

        with OutputPair(path) as out:           # temporary files are removed unless committed
            out.stage_video(frames, fps)        # encoded into a temporary sibling
            out.commit(summary)                 # summary written, then both renamed

    or, frames encoded while they are produced: `stream = out.open_video(fps)`, `stream.put(...)`,
    then `out.stage_video(None, fps)` closes it (a failure before the commit stops the encoder).

    `commit` renames the summary first and the video last; if the video's rename fails (or a signal
    lands between the two), the previous summary is put back (or the new one removed when there was
    none). Only a kill between the two renames can leave a new summary beside the previous video.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.summary_path = summary_path(path)
        self._temps: list[str] = []
        self._video_tmp: str | None = None
        self._stream: VideoStream | None = None

    def __enter__(self) -> "OutputPair":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._stream is not None:  # not staged: the run failed with the encoder running
                self._stream.abort()  # (waits for ffmpeg: a second signal may land here)
        finally:
            self._stream = None
            for tmp in self._temps:
                if os.path.lexists(tmp):
                    os.remove(tmp)
            self._temps = []

    def _tmp(self, target: str) -> str:
        tmp = _tmp_sibling(target)
        self._temps.append(tmp)
        return tmp

    def open_video(self, fps: int, quality: int = 8) -> VideoStream:
        """The video's encoder on a temporary sibling: frames `put` into it are encoded as they come."""
        assert self._stream is None and self._video_tmp is None, "one video per pair"
        self._video_tmp = self._tmp(self.path)
        self._stream = VideoStream(self._video_tmp, fps, quality)
        return self._stream

    def stage_video(self, frames, fps: int, quality: int = 8) -> None:
        """`frames` [F, H, W, 3] uint8 encoded into the temporary sibling (after those put into an open
        stream, if any; None: no more), complete when this returns."""
        stream = self._stream or self.open_video(fps, quality)
        if frames is not None:
            stream.put(frames)
        stream.close()  # the encoder's error, raised here
        self._stream = None
        os.chmod(self._video_tmp, 0o644)

    def commit(self, summary: dict[str, Any]) -> None:
        assert self._video_tmp is not None, "stage_video first"
        json_tmp = self._tmp(self.summary_path)
        _dump_json(_mark(summary, self.path), json_tmp)
        os.chmod(json_tmp, 0o644)
        previous = None
        if os.path.lexists(self.summary_path):
            previous = self._tmp(self.summary_path)
            os.replace(self.summary_path, previous)
        try:
            os.replace(json_tmp, self.summary_path)
            os.replace(self._video_tmp, self.path)
        except BaseException:  # KeyboardInterrupt and SIGTERM (signals.py) too
            if previous is not None:
                os.replace(previous, self.summary_path)
            elif os.path.lexists(self.summary_path):
                os.remove(self.summary_path)
            raise
