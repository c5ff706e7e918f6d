"""`mgm-web`: a small chat page in front of an MGM Triton server.

    mgm-web --triton_url localhost:8001 --port 7860        # then open http://127.0.0.1:7860

A stdlib ThreadingHTTPServer serves one static page (static/index.html, static/app.js) and a
JSON + server-sent-events API on top of MGMClient. The page keeps the conversation: it sends the
image, the question, the toggles and the earlier turns with every request, so this server holds no
per-user state. Endpoints:

- `GET /api/health` -> {"ready": bool, "error": str | null}
- `POST /api/chat` with {"question", "images": [data URL or base64], "history": [[user, assistant]],
  "ocr", "gen", "max_tokens", "temperature", "top_p", "conv_mode"}. A bad request gets 400 and
  {"error": message}; otherwise a `text/event-stream` of `question` ({"question": text as sent,
  "ocr": tokens}), `delta` ({"text"}) events as the model writes, then `done` ({"text",
  "output_tokens", "ttft_ms", "latency_s", "gen"}) or `error` ({"message"}).

Every failure becomes an error for that request; the server keeps serving. It binds to 127.0.0.1
unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import mimetypes
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from client.cli import build_question, check_image
from client.generation import generate_from_answer
from client.mgm_client import ClientError, MGMClient
from client.ocr import ocr_tokens
from mgm_ref.constants import MAX_IMAGES_PER_REQUEST
from mgm_ref.errors import MGMError, run_cli

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_IMAGES = MAX_IMAGES_PER_REQUEST


class BadRequest(MGMError):
    """The page sent something this server cannot use; the message is shown to the user."""


class WebDemo:
    """What the handlers share: how to reach Triton, and the optional local SDXL folder."""

    def __init__(
        self,
        triton_url: str = "localhost:8001",
        protocol: str = "grpc",
        model: str = "mgm_bls",
        sd_model: str | None = None,
        timeout_s: float = 600.0,
    ):
        self.triton_url, self.protocol, self.model = triton_url, protocol, model
        self.sd_model, self.timeout_s = sd_model, timeout_s
        self._gen_lock = threading.Lock()  # one SDXL render at a time

    def client(self) -> MGMClient:
        return MGMClient(self.triton_url, protocol=self.protocol, model=self.model, timeout_s=self.timeout_s)

    def health(self) -> dict[str, Any]:
        try:
            self.client().wait_ready(timeout_s=2.0)
            return {"ready": True, "error": None, "model": self.model, "triton_url": self.triton_url}
        except ClientError as e:
            return {"ready": False, "error": str(e), "model": self.model, "triton_url": self.triton_url}

    def render(self, answer: str) -> dict[str, Any]:
        """The <h> prompt of an answer and, when SDXL is available here, the image as a data URL."""
        with self._gen_lock, tempfile.TemporaryDirectory(prefix="mgm-web-gen-") as tmp:
            result = generate_from_answer(answer, self.sd_model, Path(tmp) / "generate.png")
            image = None
            if result.image_path:
                image = "data:image/png;base64," + base64.b64encode(result.image_path.read_bytes()).decode()
        return {"prompt": result.prompt, "image": image, "note": result.note}


def parse_chat_request(body: bytes) -> dict[str, Any]:
    """Validate the page's JSON; BadRequest with a message the user can act on."""
    try:
        req = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request is not valid JSON") from None
    if not isinstance(req, dict):
        raise BadRequest("the request must be a JSON object")
    question = req.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("type a question first")
    raw_images = req.get("images") or []
    if not isinstance(raw_images, list) or len(raw_images) > MAX_IMAGES:
        raise BadRequest(f"images must be a list of at most {MAX_IMAGES} images")
    images = [check_image(_decode_image(raw), f"#{k + 1}") for k, raw in enumerate(raw_images)]
    history = req.get("history") or []
    if not (
        isinstance(history, list)
        and all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history)
    ):
        raise BadRequest('history must be a list of ["user", "assistant"] pairs')

    def number(name, kind, default=None):
        value = req.get(name, default)
        if value is None or value == "":
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must be a number, got {value!r}") from None

    conv_mode = req.get("conv_mode") or None
    if conv_mode is not None and not isinstance(conv_mode, str):
        raise BadRequest("conv_mode must be a string")
    return {
        "question": question,
        "images": images,
        "history": [tuple(t) for t in history],
        "ocr": bool(req.get("ocr")),
        "gen": bool(req.get("gen")),
        "max_tokens": number("max_tokens", int, 512),
        "temperature": number("temperature", float),
        "top_p": number("top_p", float),
        "conv_mode": conv_mode,
    }


def _decode_image(raw: Any) -> bytes:
    if not isinstance(raw, str):
        raise BadRequest("each image must be a data URL or a base64 string")
    payload = raw.split(",", 1)[1] if raw.startswith("data:") and "," in raw else raw
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("an image is not valid base64") from None


class Handler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.1"

    # ---- plumbing ----------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _event(self, name: str, data: dict) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    # ---- routes ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/health":
            return self._json(200, self.server.demo.health())
        if path in ("/", "/index.html"):
            name = "index.html"
        elif path.startswith("/static/"):
            name = path.removeprefix("/static/")
        else:
            return self._json(404, {"error": f"no such page: {path}"})
        file = (STATIC / name).resolve()
        if file.parent != STATIC.resolve() or not file.is_file():  # no ../ escapes, no folders
            return self._json(404, {"error": f"no such page: {path}"})
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(
            200,
            file.read_bytes(),
            kind + ("; charset=utf-8" if kind.startswith("text/") or kind.endswith("javascript") else ""),
        )

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/api/chat":
            return self._json(404, {"error": f"no such endpoint: {self.path}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._json(413, {"error": f"the request must be at most {MAX_BODY_BYTES >> 20} MiB"})
        try:
            req = parse_chat_request(self.rfile.read(length))
        except (BadRequest, ClientError) as e:
            return self._json(400, {"error": str(e)})
        self.chat(req)

    def chat(self, req: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True  # the stream ends when this connection closes
        demo = self.server.demo
        try:
            tokens = ocr_tokens(req["images"]) if req["ocr"] and req["images"] else ""
            question = build_question(req["question"], tokens, req["gen"])
            self._event("question", {"question": question, "ocr": tokens})
            client = demo.client()
            client.wait_ready(timeout_s=2.0)  # "cannot reach ..." reads better than a broken-stream error
            answer = client.stream_answer(
                question,
                req["images"],
                history=req["history"],
                max_tokens=req["max_tokens"],
                temperature=req["temperature"],
                top_p=req["top_p"],
                conv_mode=req["conv_mode"],
                on_delta=lambda text: self._event("delta", {"text": text}),
            )
            gen = demo.render(answer.text) if req["gen"] else None
            self._event(
                "done",
                {
                    "text": answer.text,
                    "output_tokens": answer.output_tokens,
                    "ttft_ms": answer.ttft_ms,
                    "latency_s": answer.latency_s,
                    "gen": gen,
                },
            )
        except (BrokenPipeError, ConnectionResetError):
            return  # the page went away; leaving stream_answer cancelled the request on the server
        except Exception as e:  # noqa: BLE001 - any failure is this request's error, never the server's
            message = str(e) if isinstance(e, ClientError) else f"{type(e).__name__}: {e}"
            try:
                self._event("error", {"message": message})
            except OSError:
                pass


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], demo: WebDemo, verbose: bool = False):
        self.demo, self.verbose = demo, verbose
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(demo: WebDemo, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False) -> DemoServer:
    """A bound server (port 0 picks a free one); call serve_forever(), and shutdown() to stop."""
    return DemoServer((host, port), demo, verbose)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mgm-web", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--triton_url",
        default=None,
        help="host:port of the Triton server (default localhost:8001 for grpc, localhost:8000 for http)",
    )
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model", choices=("mgm_bls", "ensemble"), default="mgm_bls")
    p.add_argument("--model_name", default=None, help="variant added with `mgm-build repo --name NAME`")
    p.add_argument("--sd_model", default=None, help="local Stable Diffusion XL folder for generation (optional)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for an answer")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    args = p.parse_args(argv)
    return run_cli("mgm-web", lambda: serve(args), debug=args.debug)


def serve(args: argparse.Namespace) -> int:
    url = args.triton_url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    model = f"{args.model_name}_{args.model}" if args.model_name else args.model
    demo = WebDemo(url, args.protocol, model, args.sd_model, args.timeout)
    try:
        server = make_server(demo, args.host, args.port, args.verbose)
    except OSError as e:
        raise MGMError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    print(
        f"mgm-web: serving {server.url} (Triton {url}, {args.protocol}, model {args.model}); Ctrl-C stops", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
