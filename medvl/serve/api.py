"""The OpenAI Chat Completions API over a medvl model: `POST /v1/chat/completions` (streaming and
not) and `GET /v1/models`, served by FastAPI.

Everything a request carries is checked before it reaches the model, and every refusal comes back
in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`: 401 (API key, sent as
`Authorization: Bearer <key>`), 404 (unknown model or route), 408 (a request body that stops
arriving), 413 (request or image bytes), 429 (queue full), 400 (everything else that is wrong with a
request). Images come only as `data:` URLs (base64 PNG, JPEG or DICOM); the server
fetches a URL or reads a file named in a request only under the operator's allow-lists.

A scan may come as a `data:` URL too (`VOLUME_URL_TYPES`: a NIfTI file, .nii or .nii.gz, or a zipped
DICOM series): read with the checks of curation (`medvl.imaging.read_scan`), preprocessed by the model's
spec for its modality (`vlm.volumes`: its training volumes' spec, else the default) and cut into slabs
(docs/3d.md), its image part then standing for K image parts, K from the volume token budget (the
model's, or `volume_tokens`) over the model's tokens per image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medvl import RESEARCH_ONLY
from medvl.imaging import Preprocessing, read_image
from medvl.imaging.slabs import MAX_SCAN_VOXELS
from medvl.model.build import VLM, VolumePreprocessing, native_frames
from medvl.model.decode import Completion, Conversation
from medvl.serve.batcher import Batcher, QueueFull, Sampling
from medvl.serve.limits import PromptCounter

log = logging.getLogger("medvl.serve")

DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/dicom")
# Scans: NIfTI (.nii.gz is gzip; .nii has no registered type) or a DICOM series as a zip of its files.
VOLUME_URL_TYPES = ("application/gzip", "application/x-gzip", "application/x-nifti", "application/zip")
# Every answer carries the research-only label, in a header so that the OpenAI shape stays stock.
NOTICE = {"X-Medvl-Notice": RESEARCH_ONLY}


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images: int = 4
    max_volume_bytes: int = 32 * 1024 * 1024  # a scan's compressed bytes, and a zipped series unpacked
    max_volume_voxels: int = MAX_SCAN_VOXELS  # from the NIfTI header, before any voxel is read
    volume_tokens: int | None = None  # image tokens of one scan, its number of slabs (None: the model's)
    max_tokens: int = 1024  # the most a request may ask for
    max_batch_size: int = 16
    max_queue: int = 64
    # Seconds to wait for the next piece of a request body before answering 408: a client that
    # stalls half-way would otherwise hold its connection and partial body for ever.
    body_timeout_s: float = 30.0
    # Operator allow-lists; both empty by default, so no request can make the server fetch or read.
    allow_url_prefixes: tuple[str, ...] = ()
    allow_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ScanReader:
    """A scan -> the slabs the model is given: the model's volume preprocessing (with the server's
    budget, if it sets one) at the model's tokens per image, under the server's limits. The API and the
    web demo read scans through it."""

    volumes: VolumePreprocessing
    tokens_per_image: int
    max_bytes: int
    max_voxels: int
    frames: int | None = None  # native route: a scan is one input of this many slabs, whatever the budget

    @classmethod
    def of(cls, vlm: VLM, volume_tokens: int | None, max_bytes: int, max_voxels: int) -> ScanReader:
        """For `vlm`, its budget replaced by `volume_tokens` unless None; refused at start-up (ValueError)
        if the budget pays for no image."""
        volumes, per_image = vlm.volumes.with_tokens(volume_tokens), vlm.model.config.image_seq_length
        volumes.check_budget(per_image)
        return cls(volumes, per_image, max_bytes, max_voxels, native_frames(vlm.model.config))

    def slabs(self, source: str | Path | bytes, name: str | None = None) -> list[Image.Image]:
        return self.volumes.slabs(
            source,
            self.tokens_per_image,
            name,
            max_bytes=self.max_bytes,
            max_voxels=self.max_voxels,
            frames=self.frames,
        )

    def inputs(self, slabs: list[Image.Image]) -> list:
        """What the model is given for a scan: its slabs as one image part each (slices route), or the
        slabs as one volume behind one image part (native route)."""
        return [slabs] if self.frames else slabs


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the request, as OpenAI defines it (the parts medvl implements) ----


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Default 0 (greedy), as the model's generation config says, where OpenAI's default is 1.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


# ---- the app ----


def create_app(vlm: VLM, settings: ServeSettings) -> FastAPI:
    batcher = Batcher(vlm, settings.max_batch_size, settings.max_queue)
    counter = PromptCounter(vlm)
    image_size = vlm.model.config.vision_config.image_size  # images are read as in training
    scans = ScanReader.of(vlm, settings.volume_tokens, settings.max_volume_bytes, settings.max_volume_voxels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="medvl", description=RESEARCH_ONLY, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.add_middleware(BodyTimeout, seconds=settings.body_timeout_s)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _check_key(request, settings)
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "medvl"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, settings)
        req = _parse(await _read_body(request, settings.max_request_bytes))
        if req.model != settings.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {settings.model_name!r}",
                "model",
                "model_not_found",
            )
        conversation = await _conversation(req, settings, image_size, scans, vlm.preprocessing)
        prompt_tokens = await run_in_threadpool(counter.count, conversation)
        sampling = _sampling(req, prompt_tokens, counter.context, settings)
        try:
            job = batcher.submit(conversation, sampling, stream=req.stream)
        except QueueFull:
            raise APIError(
                429, "server is busy: the request queue is full; retry later", code="queue_full"
            ) from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _sse(job.results(), rid, created, settings.model_name, include_usage)
            headers = {"Cache-Control": "no-cache", **NOTICE}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        async for kind, payload in job.results():
            if kind == "error":
                raise APIError(500, str(payload))
            if kind == "done":
                return JSONResponse(
                    _completion_body(payload, rid, created, settings.model_name), headers=NOTICE
                )

    return app


class BodyTimeout:
    """ASGI middleware: a request body that stops arriving for `seconds` ends the request with 408
    (and the connection with it). uvicorn times idle keep-alive connections, not a body stalled
    half-way. Only the waits for body pieces are timed: once the body is complete, `receive` is passed
    through untimed, since a streaming response waits on it for a disconnect as long as it streams."""

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def timed_receive() -> dict:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except TimeoutError:
                # Raised inside the endpoint's body read, so the app answers it like any APIError.
                raise APIError(
                    408,
                    f"the request body stopped arriving (nothing for {self.seconds:g} s)",
                    code="request_timeout",
                    headers={"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


def _check_key(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        problem = "missing API key: send the header 'Authorization: Bearer <key>'"
    elif scheme.lower() != "bearer":
        problem = "the Authorization header must read 'Bearer <key>'"
    elif not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
        problem = "incorrect API key"
    else:
        return
    raise APIError(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (not after reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(
            413, f"request body is {declared} bytes, above the {limit}-byte limit", code="request_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is above the {limit}-byte limit", code="request_too_large")
    return bytes(body)


def _parse(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # Drop the union-member tags pydantic adds to a location ("str", "list[...]").
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and (p == "str" or "[" in p))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unsupported parameter {param!r}", param, "unsupported_parameter") from None
        raise APIError(400, f"{param}: {err['msg']}", param, "invalid_value") from None


async def _conversation(
    req: ChatRequest,
    settings: ServeSettings,
    image_size: int,
    scans: ScanReader,
    preprocessing: Preprocessing,
) -> Conversation:
    """The request's messages in the transformers shape, with its images decoded (off the event loop);
    a scan's image part becomes one image part per slab (slices route) or stays one (native route)."""
    if req.messages[-1].role != "user":
        raise APIError(
            400, "the last message must come from the user", f"messages.{len(req.messages) - 1}.role"
        )
    messages, urls = [], []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            parts = [{"type": "text", "text": m.content}]
        else:
            parts = []
            for j, p in enumerate(m.content):
                if isinstance(p, ImagePart):
                    if m.role != "user":
                        raise APIError(
                            400, "images may only be sent in user messages", f"messages.{i}.content.{j}"
                        )
                    parts.append({"type": "image"})
                    urls.append(
                        (f"messages.{i}.content.{j}.image_url.url", p.image_url.url, i, len(parts) - 1)
                    )
                else:
                    parts.append({"type": "text", "text": p.text})
        if m.role == "user" and not any(p["type"] == "image" or p["text"].strip() for p in parts):
            raise APIError(400, "user message has no content", f"messages.{i}.content")
        messages.append({"role": m.role, "content": parts})
    if len(urls) > settings.max_images:
        raise APIError(
            400, f"{len(urls)} images, above the limit of {settings.max_images} per request", "messages"
        )
    decoded = [
        await _images(url, param, settings, image_size, scans, preprocessing) for param, url, *_ in urls
    ]
    for (*_, i, j), images in reversed(list(zip(urls, decoded, strict=True))):  # later parts first
        messages[i]["content"][j : j + 1] = [{"type": "image"}] * len(images)
    return Conversation(messages, [im for images in decoded for im in images])


async def _images(
    url: str, param: str, settings: ServeSettings, size: int, scans: ScanReader, preprocessing: Preprocessing
) -> list:
    """An image part's images: one, or a scan's inputs (`ScanReader.inputs`)."""
    if url.startswith("data:"):
        mime, data = _data_url_bytes(url, param, settings)
        if mime in VOLUME_URL_TYPES:
            try:
                return scans.inputs(await run_in_threadpool(scans.slabs, data))
            except ValueError as e:
                raise APIError(400, f"{param}: {e}", param, "invalid_volume") from None
    elif url.startswith(("http://", "https://")):
        data = await _fetch(url, param, settings)
    elif url.startswith("file:"):
        data = _read_allowed_file(url, param, settings)
    else:
        raise APIError(
            400,
            "image_url must be a data: URL (base64 PNG, JPEG, DICOM, NIfTI or a zipped DICOM series)",
            param,
            "invalid_image_url",
        )
    try:
        image = await run_in_threadpool(
            read_image,
            data,
            preprocessing,
            size=size,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            formats=("PNG", "JPEG"),
        )
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param, "invalid_image") from None
    return [image]


def _data_url_bytes(url: str, param: str, settings: ServeSettings) -> tuple[str, bytes]:
    """A data: URL's type (lower case) and its decoded bytes, within the limit of its kind."""
    header, sep, payload = url[5:].partition(",")
    mime, *options = header.split(";")
    if not sep or "base64" not in options:
        raise APIError(
            400, "data: URL must be base64 encoded (data:<type>;base64,<data>)", param, "invalid_image_url"
        )
    mime, kinds = mime.lower(), DATA_URL_TYPES + VOLUME_URL_TYPES
    if mime not in kinds:
        raise APIError(
            400,
            f"image type {mime!r} is not supported; use one of {', '.join(kinds)}",
            param,
            "invalid_image_url",
        )
    scan = mime in VOLUME_URL_TYPES
    limit = settings.max_volume_bytes if scan else settings.max_image_bytes
    if len(payload) * 3 // 4 > limit:
        what = "volume" if scan else "image"
        raise APIError(
            413,
            f"{what} is about {len(payload) * 3 // 4} bytes, above the {limit}-byte limit",
            param,
            "volume_too_large" if scan else "image_too_large",
        )
    try:
        return mime, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "data: URL payload is not valid base64", param, "invalid_image_url") from None


def _allowed_url(url: httpx.URL, prefixes: tuple[str, ...]) -> bool:
    """Same scheme and host as an allowed prefix, a path under its path, no `..` segments and no
    credentials: compared on parsed URLs, so `https://pacs.example.org.evil.com` never matches."""
    if url.userinfo or ".." in unquote(url.path).split("/"):
        return False
    for prefix in map(httpx.URL, prefixes):
        if (url.scheme, url.host, url.port) == (
            prefix.scheme,
            prefix.host,
            prefix.port,
        ) and url.path.startswith(prefix.path):
            return True
    return False


async def _fetch(url: str, param: str, settings: ServeSettings) -> bytes:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise APIError(400, "image_url is not a valid URL", param, "invalid_image_url") from None
    if not _allowed_url(parsed, settings.allow_url_prefixes):
        raise APIError(
            400,
            "this server does not fetch remote image URLs; send the image as a data: URL "
            "(base64 PNG, JPEG or DICOM)",
            param,
            "image_url_not_allowed",
        )
    limit = settings.max_image_bytes
    # Redirects are never followed: the allow-list vouches for this URL, not for where it points.
    async with httpx.AsyncClient(follow_redirects=False, timeout=10.0, trust_env=False) as client:
        try:
            async with client.stream("GET", parsed) as response:
                if response.status_code != 200:
                    raise APIError(
                        400,
                        f"fetching the image gave HTTP {response.status_code} (redirects are not followed)",
                        param,
                        "image_fetch_failed",
                    )
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise APIError(
                            413, f"image is above the {limit}-byte limit", param, "image_too_large"
                        )
                return bytes(data)
        except httpx.HTTPError as e:
            raise APIError(
                400, f"fetching the image failed: {type(e).__name__}", param, "image_fetch_failed"
            ) from None


def _read_allowed_file(url: str, param: str, settings: ServeSettings) -> bytes:
    parts = urlsplit(url)
    path = Path(unquote(parts.path)).resolve()
    # Resolved (symlinks and `..` followed) before the check, so no path escapes an allowed folder.
    allowed = parts.netloc in ("", "localhost") and Path(unquote(parts.path)).is_absolute()
    if not (allowed and any(path.is_relative_to(d.resolve()) for d in settings.allow_dirs)):
        raise APIError(
            400,
            "this server does not read local files named in a request; send the image as a data: URL",
            param,
            "image_url_not_allowed",
        )
    if not path.is_file():
        raise APIError(400, "image file not found", param, "invalid_image_url")
    if path.stat().st_size > settings.max_image_bytes:
        raise APIError(
            413, f"image is above the {settings.max_image_bytes}-byte limit", param, "image_too_large"
        )
    return path.read_bytes()


def _sampling(req: ChatRequest, prompt_tokens: int, context: int, settings: ServeSettings) -> Sampling:
    room = context - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"prompt is {prompt_tokens} tokens; the model's context is {context}",
            "messages",
            "context_length_exceeded",
        )
    asked = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > settings.max_tokens:
        raise APIError(400, f"{param}={asked} is above this server's limit of {settings.max_tokens}", param)
    if asked is not None and asked > room:
        raise APIError(
            400,
            f"prompt ({prompt_tokens} tokens) + {param} ({asked}) exceed the model's "
            f"context of {context} tokens",
            param,
            "context_length_exceeded",
        )
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes at most 4 non-empty strings", "stop")
    return Sampling(
        max_tokens=asked or min(settings.max_tokens, room),
        temperature=req.temperature or 0.0,
        top_p=req.top_p or 1.0,
        stop=tuple(stops),
        seed=req.seed,
    )


def _usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def _completion_body(c: Completion, rid: str, created: int, model: str) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(c),
    }


async def _sse(
    events: AsyncIterator[tuple[str, object]], rid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's `chat.completion.chunk` format, ending with `[DONE]`."""

    def chunk(delta: dict, finish: str | None = None, choices: bool = True, usage: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        body["choices"] = (
            [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []
        )
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for kind, payload in events:
        if kind == "delta":
            yield chunk({"content": payload})
        elif kind == "done":
            yield chunk({}, payload.finish_reason)
            if include_usage:
                yield chunk({}, choices=False, usage=_usage(payload))
        else:  # headers are sent already: report the failure the way OpenAI streams do
            yield f"data: {json.dumps(APIError(500, str(payload)).body())}\n\n"
    yield "data: [DONE]\n\n"
