"""The mp4 encoded while the VAE decodes: frames go to ffmpeg as they come, from a thread.

The VAE decodes one latent frame (four video frames) at a time, and x264 runs in its own
process: handing each chunk over as it is decoded lets the encoder work during the decode instead
of after it (the `write` stage then only waits for the last chunks). The frames and the writer's
settings are the ones the whole-video path (`encode_video`) uses, so the file is the same.

    stream = VideoStream(tmp_path, fps, quality)   # the writer; frames go to a worker thread
    stream.put(frames)                              # [t, H, W, 3] uint8, in order, any number of calls
    stream.close()                                  # waits for the encoder; raises what it raised
    stream.abort()                                  # on failure: stops the encoder and removes the file
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Optional

import numpy as np

# chunks of frames waiting for the encoder: a bound on the host memory a slow encoder can hold
# (at 4 frames a chunk, 128 frames of 720p uint8 = 354 MB); a full queue makes the decode wait
MAX_QUEUED_CHUNKS = 32


def open_writer(path: str, fps: int, quality: int):
    import imageio.v2 as imageio

    # macro_block_size=1: sizes are multiples of 16 already; never let imageio resize frames
    return imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                              pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")


def as_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def encode_video(frames, path: str, fps: int, quality: int = 8) -> None:
    """frames [F, H, W, 3] uint8 (tensor or array) -> H.264 mp4 written at `path` (not atomically), in
    the caller's thread; `quality` 1-9 (output.quality: x264 crf 51 x (1 - quality / 10))."""
    frames = as_frames(frames)
    with open_writer(path, fps, quality) as w:
        for frame in frames:
            w.append_data(frame)


class VideoStream:
    """An H.264 mp4 at `path`, encoded from the frames `put` hands over, in a worker thread."""

    def __init__(self, path: str, fps: int, quality: int):
        self.path = path
        self.frames = 0  # frames handed over so far
        self._writer = open_writer(path, fps, quality)
        self._queue: "queue.Queue[Optional[np.ndarray]]" = queue.Queue(MAX_QUEUED_CHUNKS)
        self._error: Optional[BaseException] = None
        self._ended = False  # the end marker is queued
        self._aborted = False
        self._thread = threading.Thread(target=self._encode, name="lightx2v_sp-mp4", daemon=True)
        self._thread.start()

    def _encode(self) -> None:
        while (chunk := self._queue.get()) is not None:
            try:
                for frame in chunk:
                    if self._error is not None:
                        break  # keep taking chunks, so that `put` never blocks on a dead encoder
                    self._writer.append_data(frame)
            except BaseException as e:  # noqa: BLE001 - raised by close() in the caller's thread
                self._error = e
        try:
            self._writer.close()
        except BaseException as e:  # noqa: BLE001
            self._error = self._error or e
        if self._aborted:  # ffmpeg may have (re)created the file after the caller removed it
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def put(self, frames) -> None:
        """Queue frames [t, H, W, 3] uint8 (tensor or array) after the ones before."""
        frames = as_frames(frames)
        self.frames += len(frames)
        self._queue.put(frames)

    def close(self) -> None:
        """Wait until every frame is encoded and the file complete; the encoder's error, if any."""
        self._end()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _end(self) -> None:
        # the end marker, once: `_ended` is set only after the put returned, so a signal that cut a put
        # blocked on a full queue leaves abort() to send it (else the worker would wait forever)
        if not self._ended:
            self._queue.put(None)
            self._ended = True

    def abort(self) -> None:
        """Stop at the next frame without raising (the run failed already); the file is removed, by
        the worker thread once ffmpeg has let go of it (also when a second signal cuts this wait short).
        Also after `close` began: a signal may have cut its wait, and the encoder would go on writing."""
        self._aborted = True  # the thread removes the file once ffmpeg is done with it
        self._error = self._error or RuntimeError("aborted")  # the worker skips the frames still queued
        self._end()
        self._thread.join()
        try:  # the worker may have finished before it saw `_aborted`
            os.remove(self.path)
        except FileNotFoundError:
            pass
