"""`mgm-openai`: an OpenAI-compatible chat API (FastAPI) in front of the MGM Triton server.

    mgm-openai --triton_url 127.0.0.1:8001 --port 9000
    curl 127.0.0.1:9000/v1/chat/completions -d '{"model": "mgm", "messages": [...]}'

Endpoints: POST /v1/chat/completions (streaming as SSE), GET /v1/models, GET /health (200 once
every model behind it is ready, else 503), GET /metrics (Prometheus). Limits, all refused with 413
before anything is decoded: the request body (--max_body_mb, default 20 MiB) and each image
(--max_image_mb, default 10 MiB encoded); at most --max_images images (default 8; the model's own
limit, 1 for HD models, is enforced by the server with a 400).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.openai_api import schema
from client.openai_api.errors import APIError, bad_request, too_large
from client.openai_api.mapping import MGMRequest, StopMatcher, to_mgm
from client.openai_api.media import MediaPolicy, MiB
from client.openai_api.metrics import Metrics
from client.openai_api.triton import TritonBackend, Variant
from triton_models.launcher.argv import ADMIN_KEY_ENV

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody receives it, the logs do


@dataclass
class Settings:
    triton_url: str
    served_model_name: str = "mgm"  # the name of an unprefixed `mgm_bls`
    max_body_bytes: int = 20 * MiB
    max_images: int = 8
    default_max_tokens: int = 256
    timeout_s: float = 600.0
    media: MediaPolicy = field(default_factory=MediaPolicy)
    triton_admin_key: str | None = None  # for the repository index, when mgm-serve restricts it


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


@dataclass
class Generation:
    """One answer as it streams: deltas already cut at the stop sequences, token counts, timings."""

    start: float
    max_tokens: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stopped: bool = False
    ttft_s: float | None = None

    @property
    def finish_reason(self) -> str:
        if not self.stopped and self.completion_tokens >= self.max_tokens:
            return "length"
        return "stop"

    @property
    def usage(self) -> schema.Usage:
        return schema.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


async def _deltas(backend: TritonBackend, variant: Variant, mgm: MGMRequest, gen: Generation):
    matcher = StopMatcher(mgm.stops) if mgm.stops else None
    events = backend.generate(variant, mgm.tensors())
    try:
        async for ev in events:
            gen.prompt_tokens, gen.completion_tokens = ev.prompt_tokens, ev.completion_tokens
            text = ev.text
            if matcher is not None:
                text = matcher.push(text) + (matcher.flush() if ev.final and not matcher.stopped else "")
                gen.stopped = matcher.stopped
            if text and gen.ttft_s is None:
                gen.ttft_s = time.perf_counter() - gen.start
            yield text
            if gen.stopped:
                return  # closing `events` cancels the rest of the generation
    finally:
        await events.aclose()


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, cancelling it (and so the Triton request) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        raise ClientGone
    return work.result()


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(f"the request body is over the server's limit of {limit / MiB:g} MiB")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large(f"the request body is over the server's limit of {limit / MiB:g} MiB")
    return bytes(body)


def _parse(body: bytes) -> schema.ChatCompletionRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    try:
        return schema.ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param or None) from None


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(schema.error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _ContentEvents:
    """The SSE events of one streamed answer's text deltas: the chunk envelope is rendered once and each
    delta's text is escaped into it (a JSON encode of the whole chunk per token is the costliest step
    of the stream after the gRPC read)."""

    _HOLE = "\x00"  # json.dumps writes it as \u0000; the delta is the envelope's last string field

    def __init__(self, id_: str, model: str, created: int, include_usage: bool):
        event = _sse(schema.chunk(id_, model, created, {"content": self._HOLE}, include_usage=include_usage))
        self._head, _, self._tail = event.rpartition(json.dumps(self._HOLE))

    def __call__(self, text: str) -> str:
        return self._head + json.dumps(text) + self._tail


def create_app(settings: Settings) -> FastAPI:
    backend = TritonBackend(
        settings.triton_url, settings.served_model_name, settings.timeout_s, settings.triton_admin_key
    )
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await backend.close()

    app = FastAPI(title="MGM OpenAI-compatible API", lifespan=lifespan)
    app.state.backend, app.state.metrics, app.state.settings = backend, metrics, settings

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        metrics.errors.labels(str(e.status), e.code or "").inc()
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return JSONResponse(schema.error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.get("/v1/models")
    async def models():
        found = await backend.variants()
        return {
            "object": "list",
            "data": [
                {"id": v.name, "object": "model", "created": 0, "owned_by": "mgm-deploy"}
                for v in found.values()
                if v.ready
            ],
        }

    @app.get("/health")
    async def health():
        found = await backend.variants(fresh=True)
        ok = bool(found) and all(v.ready for v in found.values())
        body = {
            "status": "ok" if ok else "unavailable",
            "models": {v.name: "ready" if v.ready else v.reason for v in found.values()},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        start = time.perf_counter()
        label = "unknown"  # user-chosen names stay out of the metric labels until they resolve
        try:
            req = _parse(await _read_body(request, settings.max_body_bytes))
            variant = await backend.resolve(req.model)
            label = variant.name
            mgm = await to_mgm(req, settings.media, settings.max_images, settings.default_max_tokens)
            gen = Generation(start, mgm.spec.max_tokens)
            deltas = _deltas(backend, variant, mgm, gen)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                try:  # wait for the first piece so that bad input still gets its 4xx status
                    first = await _unless_disconnected(request, deltas.__anext__())
                except BaseException:
                    await deltas.aclose()
                    raise
                return StreamingResponse(
                    _stream(req.model, gen, first, deltas, include_usage, label),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            text = await _unless_disconnected(request, _collect(deltas))
        except APIError as e:
            metrics.error(label, e.status, e.code)
            return _error_response(e)
        except ClientGone:
            metrics.error(label, CLIENT_CLOSED, "client_closed")
            return Response(status_code=CLIENT_CLOSED)
        metrics.done(label, gen.prompt_tokens, gen.completion_tokens, gen.ttft_s, time.perf_counter() - start)
        return schema.completion(schema.new_id(), req.model, text, gen.finish_reason, gen.usage)

    async def _collect(deltas) -> str:
        return "".join([d async for d in deltas]).strip()

    async def _stream(model: str, gen: Generation, first: str, deltas, include_usage: bool, label: str):
        id_, created = schema.new_id(), int(time.time())
        status = "200"
        try:
            # The role chunk and the first text leave in one write: one send less on the TTFT path.
            head = _sse(
                schema.chunk(id_, model, created, {"role": "assistant", "content": ""}, include_usage=include_usage)
            )
            content = _ContentEvents(id_, model, created, include_usage)
            text = first
            while True:
                if text or head:
                    yield head + (content(text) if text else "")
                    head = ""
                try:
                    text = await deltas.__anext__()
                except StopAsyncIteration:
                    break
            yield _sse(schema.chunk(id_, model, created, {}, gen.finish_reason, include_usage=include_usage))
            if include_usage:
                yield _sse(schema.usage_chunk(id_, model, created, gen.usage))
        except APIError as e:  # after the 200 went out: an error event, as OpenAI's streams do
            status = str(e.status)
            metrics.errors.labels(status, e.code or "").inc()
            yield _sse(schema.error_body(e.message, e.type, e.param, e.code))
        except asyncio.CancelledError:  # the client went away: closing `deltas` cancels the generation
            status = str(CLIENT_CLOSED)
            metrics.errors.labels(status, "client_closed").inc()
            raise
        finally:
            await deltas.aclose()
            if status == "200":
                metrics.done(
                    label, gen.prompt_tokens, gen.completion_tokens, gen.ttft_s, time.perf_counter() - gen.start
                )
            else:
                metrics.requests.labels(label, status).inc()
        yield "data: [DONE]\n\n"

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgm-openai", description="OpenAI-compatible chat API for an MGM Triton server.")
    p.add_argument("--triton_url", default="127.0.0.1:8001", help="host:port of Triton's gRPC endpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve other hosts)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--served_model_name", default="mgm", help="model id of the repository's unprefixed mgm_bls")
    p.add_argument("--max_body_mb", type=float, default=20.0, help="largest request body (413 above)")
    p.add_argument("--max_image_mb", type=float, default=10.0, help="largest encoded image (413 above)")
    p.add_argument("--max_images", type=int, default=8, help="most images in one request")
    p.add_argument("--default_max_tokens", type=int, default=256, help="when the request sets no max_tokens")
    p.add_argument(
        "--allowed_media_domains",
        nargs="*",
        default=[],
        help="hosts that http(s) image URLs may point to (default: none; image URLs are refused)",
    )
    p.add_argument(
        "--allowed_local_media_path",
        type=Path,
        default=None,
        help="folder that file:// image URLs may point into (default: file:// refused)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one answer may take")
    p.add_argument("--log_level", default="warning")
    p.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop (auto: uvloop if installed)"
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    media = MediaPolicy(
        max_image_bytes=int(args.max_image_mb * MiB),
        allowed_domains=tuple(d.lower() for d in args.allowed_media_domains),
        allowed_local_path=args.allowed_local_media_path,
    )
    return Settings(
        args.triton_url,
        args.served_model_name,
        int(args.max_body_mb * MiB),
        args.max_images,
        args.default_max_tokens,
        args.timeout,
        media,
        os.environ.get(ADMIN_KEY_ENV) or None,
    )


def main(argv=None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    uvicorn.run(
        create_app(settings_from(args)),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        loop=args.loop,
    )
    return 0
