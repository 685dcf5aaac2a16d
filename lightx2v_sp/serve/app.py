"""The HTTP front on rank 0: OpenAI's video API shape over the job board, and the page at `/`.

    POST   /v1/videos                JSON, or a multipart form (an image as file `image` /
                                     `input_reference`, or base64 in JSON) -> the job, status queued
    GET    /v1/videos                the jobs, newest first
    GET    /v1/videos/{id}           status, progress (step k of n), timings, the error of a failed job
    GET    /v1/videos/{id}/content   the mp4 of a completed job
    GET    /v1/videos/{id}/summary   its JSON summary (stage times, layout, config)
    DELETE /v1/videos/{id}           cancel a queued job, stop a running one at its next step, or
                                     forget a finished one and remove its files
    GET    /v1/models                the loaded model and the defaults of a job
    GET    /health, GET /            state and counts; the page (no key needed for either)

A request is checked before it is queued by the checks of a config (pipeline/job.py), so a bad
one is a 400 with the one-line message `generate` prints for the same values. Ids are made here
("video_" + 32 hex digits) and are the only names on disk, in serve.output_dir; no name or path
from a request reaches the file system. Bodies are bounded by serve.max_request_bytes (413).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightx2v_sp.pipeline.image import open_image
from lightx2v_sp.pipeline.job import DERIVED, FIELDS, check_size, job_config, job_overrides
from lightx2v_sp.pipeline.kind import check_inputs

from .board import JobBoard, NotAccepting, QueueFull, Record
from .loop import Job

REQUEST_FIELDS = tuple(f for f in FIELDS if f not in ("image", "output")) + DERIVED
IMAGE_FIELDS = ("image", "input_reference")
IGNORED_FIELDS = ("model",)  # OpenAI clients always send one; there is one model here
JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
# the page loads nothing from elsewhere; the video plays from a blob: URL (fetched with the key)
PAGE_CSP = ("default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServeInfo:
    base: Any                  # the loaded config, image cleared: every job starts from it
    output_dir: str            # absolute; videos and summaries, uploads/ for images
    api_key: Optional[str]
    kind: Any = None           # the loaded model's ModelKind, once loaded


def _error(status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None,
           headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                        headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = _error(413, f"the request body has {length.decode(errors='replace')} bytes; "
                                   f"serve.max_request_bytes = {self.limit}", code="request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the request body is over serve.max_request_bytes = {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def _decode_image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("request: image must be a file upload or a base64 string (a data: URL is fine)")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("request: image is not valid base64") from None


async def _read_request(request: Request) -> tuple[dict, Optional[bytes], bool]:
    """(fields, image bytes or None, from a form) of a POST /v1/videos."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    image = None
    if ctype == "application/json":
        try:
            fields = json.loads(await request.body())
        except ValueError as e:
            raise ValueError(f"request: the body is not JSON ({e})") from None
        if not isinstance(fields, dict):
            raise ValueError("request: the body must be a JSON object such as {\"prompt\": \"a cat\"}")
        for name in IMAGE_FIELDS:
            if fields.get(name) is not None:
                image = _decode_image(fields.pop(name))
            fields.pop(name, None)
        form = False
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields, form = {}, True
        async with request.form(max_files=1, max_fields=32) as data:
            for name, value in data.multi_items():
                if name in fields or (name in IMAGE_FIELDS and image is not None):
                    raise ValueError(f"request: field {name!r} is given twice")
                if name in IMAGE_FIELDS:
                    if isinstance(value, UploadFile):
                        content = await value.read()
                        image = content if content or value.filename else None  # an empty file input: none
                    elif value:
                        image = _decode_image(value)
                elif isinstance(value, UploadFile):
                    raise ValueError(f"request: field {name!r} is a file; only image takes one")
                elif value != "" or name in ("prompt", "negative_prompt"):  # an empty form input: not given
                    fields[name] = value
    else:
        raise ValueError(f"request: Content-Type {ctype or 'none'} is not application/json or multipart/form-data")
    for name in IGNORED_FIELDS:
        fields.pop(name, None)
    return fields, image, form


def create_app(board: JobBoard, info: ServeInfo) -> FastAPI:
    # no /docs: FastAPI's documentation pages load their scripts from a CDN
    app = FastAPI(title="lightx2v_sp", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=info.base.serve.max_request_bytes)
    uploads = os.path.join(info.output_dir, "uploads")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                      headers=getattr(exc, "headers", None))

    def authorized(request: Request) -> None:
        if not info.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), info.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    def found(video_id: str, lookup=board.record):
        """`lookup(video_id)` (a record by default), or 404 for an unknown or malformed id."""
        out = lookup(video_id) if JOB_ID.match(video_id) else None
        if out is None:
            raise HTTPException(404, f"no video with id {video_id!r}")
        return out

    @v1.post("/videos")
    async def create_video(request: Request):
        if board.state != "ready":
            return _error(503, f"not taking jobs: {board.reason}", kind="server_error", code="unavailable")
        job_id, upload = f"video_{uuid.uuid4().hex}", None
        try:
            fields, image, form = await _read_request(request)
            if "prompt" not in fields:
                raise ValueError("request: prompt is required")
            overrides = job_overrides(fields, "request", REQUEST_FIELDS, info.base.sample.fps,
                                      info.base.serve.max_prompt_chars, text=form)
            if image is not None:
                os.makedirs(uploads, exist_ok=True)
                upload = os.path.join(uploads, job_id)
                with open(upload, "wb") as f:
                    f.write(image)
                overrides["image"] = upload
            overrides["output.path"] = os.path.join(info.output_dir, f"{job_id}.mp4")
            cfg = job_config(info.base, overrides)
            check_inputs(info.kind, cfg)
            check_size(info.base, cfg)
            if upload is not None:
                open_image(upload)
            s = cfg.sample
            request_view = {"prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "seed": cfg.seed,
                            "guidance_scale": s.guidance_scale, "image": upload is not None}
            return board.submit(Record(job=Job(job_id, cfg, job_id), request=request_view, upload=upload))
        except ValueError as e:
            message = str(e).replace(upload, "<the uploaded image>") if upload else str(e)
            error = _error(400, message)
        except QueueFull as e:
            error = _error(429, str(e), kind="rate_limit_error", code="queue_full")
        except NotAccepting as e:
            error = _error(503, f"not taking jobs: {e}", kind="server_error", code="unavailable")
        if upload is not None and os.path.exists(upload):
            os.remove(upload)
        return error

    @v1.get("/videos")
    def list_videos():
        return {"object": "list", "data": board.list()}

    @v1.get("/videos/{video_id}")
    def get_video(video_id: str):
        return found(video_id, board.get)

    @v1.get("/videos/{video_id}/content")
    def get_content(video_id: str):
        record: Record = found(video_id)
        if record.status != "completed":
            raise HTTPException(404, f"{video_id} is {record.status}; its video exists once it is completed")
        return FileResponse(record.job.cfg.output.path, media_type="video/mp4", filename=f"{video_id}.mp4",
                            content_disposition_type="inline")

    @v1.get("/videos/{video_id}/summary")
    def get_summary(video_id: str):
        record: Record = found(video_id)
        if record.summary is None:
            raise HTTPException(404, f"{video_id} is {record.status}; its summary exists once it is completed")
        return JSONResponse(json.loads(json.dumps(record.summary, default=str)))

    @v1.delete("/videos/{video_id}")
    def delete_video(video_id: str):
        return found(video_id, board.cancel)

    @v1.get("/models")
    def models():
        s, kind = info.base.sample, info.kind
        return {"object": "list", "data": [] if kind is None else [{
            "id": kind.name, "object": "model", "image_input": bool(kind.image_input or kind.first_frame),
            "image_required": bool(kind.image_input),
            "defaults": {"size": f"{s.width}x{s.height}", "num_frames": s.num_frames, "fps": s.fps,
                         "steps": s.steps, "guidance_scale": s.guidance_scale, "seed": info.base.seed,
                         "negative_prompt": info.base.negative_prompt},
            "max": {"pixels": s.width * s.height, "num_frames": s.num_frames}}]}

    app.include_router(v1)

    @app.get("/health")
    def health():
        return board.health()

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read(), headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    return app
