"""Writing results: the mp4 and its JSON summary, each atomically (temporary file + rename).

A reader never sees a half-written video: the frames go to a hidden temporary file in the same
directory (so the rename stays on one filesystem), which replaces the target only once complete;
any failure removes the temporary file. `check_writable` runs before the expensive work so an
unwritable path fails in seconds, not after the denoising.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


def summary_path(video_path: str) -> str:
    return os.path.splitext(video_path)[0] + ".json"


def check_writable(path: str) -> str:
    """Absolute output path after checking that a file can be created there (ValueError if not)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"output.path = {path} is a directory; give a file name such as {path}/video.mp4")
    if not path.lower().endswith(".mp4"):
        raise ValueError(f"output.path = {path} must end with .mp4; the video is written as H.264 mp4")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-", delete=True):
            pass
    except OSError as e:
        raise ValueError(f"output.path = {path} is not writable ({e.strerror or e}); no video could be saved, "
                         "so the run was not started") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"output.path = {path} exists and is read-only; it could not be replaced")
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
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=os.path.dirname(path))
    os.close(fd)
    return tmp


def _atomic(path: str, write) -> None:
    tmp = _tmp_sibling(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_video(frames, path: str, fps: int) -> None:
    """frames [F, H, W, 3] uint8 (tensor or array) -> H.264 mp4 at `path`, atomically."""
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")

    def write(tmp: str) -> None:
        # macro_block_size=1: sizes are multiples of 16 already; never let imageio resize frames
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error") as w:
            for frame in frames:
                w.append_data(frame)

    _atomic(path, write)


def write_json(data: dict[str, Any], path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")

    _atomic(path, write)
