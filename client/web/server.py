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
unless told otherwise: it has no authentication. Hardening, as any page in the operator's browser
can reach it: `POST /api/chat` takes only `application/json` from its own origin (or one named with
`--allowed_origins`), so a cross-site form or fetch is refused with 403/415; at most
`--max_connections` connections are served at once (more get 503 from one refusing thread, never a
thread each), every socket read and write times out after `--socket_timeout` seconds, and every
request, however malformed, gets an HTTP answer with a JSON error. When the page goes away mid-answer,
a watcher sees the closed socket and cancels the Triton request behind it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import mimetypes
import queue
import select
import socket
import sys
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from client.cli import build_question, check_image
from client.generation import generate_from_answer
from client.mgm_client import ClientCancelled, ClientError, MGMClient
from client.ocr import ocr_tokens
from mgm_ref.constants import MAX_IMAGE_BYTES, MAX_IMAGES_PER_REQUEST, MAX_TEXT_BYTES
from mgm_ref.errors import MGMError, run_cli

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_IMAGES = MAX_IMAGES_PER_REQUEST
# The page sends the images base64-encoded (4 bytes per 3) and the text JSON-escaped (at most 6 bytes
# per byte, for \u00XX), so a body within the shared limits is at most this long.
MAX_BODY_BYTES = -(-MAX_IMAGES * MAX_IMAGE_BYTES // 3) * 4 + 6 * MAX_TEXT_BYTES + 64 * 1024
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_SOCKET_TIMEOUT_S = 30.0
REFUSAL_BACKLOG = 1024  # connections waiting for their 503 (beyond: closed unanswered)
DISCONNECT_POLL_S = 0.25  # how often a running answer checks that its page is still connected


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
    except RecursionError:
        raise BadRequest("the request's JSON is nested too deeply") from None
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
    size = sum(len(t.encode("utf-8", errors="replace")) for t in [question, *(x for turn in history for x in turn)])
    if size > MAX_TEXT_BYTES:
        raise BadRequest(f"the question and history are {size} bytes; the limit is {MAX_TEXT_BYTES}")

    def number(name, kind, default=None):
        value = req.get(name, default)
        if value is None or value == "":
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BadRequest(f"{name} must be a number")
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise BadRequest(f"{name} must be a number, got {str(value)[:40]}") from None

    conv_mode = req.get("conv_mode") or None
    if conv_mode is not None and not isinstance(conv_mode, str):
        raise BadRequest("conv_mode must be a string")
    max_tokens = number("max_tokens", int, 512)
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
    return {
        "question": question,
        "images": images,
        "history": [tuple(t) for t in history],
        "ocr": bool(req.get("ocr")),
        "gen": bool(req.get("gen")),
        "max_tokens": max_tokens,
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
    def setup(self) -> None:
        self.timeout = self.server.socket_timeout_s  # every read and write of this connection
        super().setup()

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def handle_one_request(self) -> None:
        """The standard loop, except that no request ends without an answer: a read that times out gets
        408 and a bug in a handler 500 (the stock handler drops the connection for both)."""
        self.responded = False
        self.requestline, self.request_version, self.command = "", self.protocol_version, ""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > 65536:
                return self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            if not self.parse_request():  # it answered with its own error
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                return self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {self.command}")
            method()
            self.wfile.flush()
        except TimeoutError:
            self._last_words(HTTPStatus.REQUEST_TIMEOUT, "the request did not arrive in time")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a handler bug answers 500; the server keeps serving
            log.exception("mgm-web: internal error on %r", self.requestline)
            self._last_words(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error in mgm-web (its log has the details)")

    def _last_words(self, status: int, message: str) -> None:
        self.close_connection = True
        if self.responded:
            return
        try:
            self._json(status, {"error": message})
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by the HTTP parser, as JSON like every other error of this server."""
        if self.request_version == "HTTP/0.9":  # what the parser assumes of a garbled request line
            self.request_version = "HTTP/1.1"
        self._json(int(code), {"error": message or HTTPStatus(code).phrase})

    def send_response(self, code: int, message: str | None = None) -> None:
        self.responded = True
        super().send_response(code, message)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        if status >= 400:
            self.close_connection = True  # the rest of a refused request may still be on the wire
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
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
        origin = self.headers.get("Origin")
        if origin is not None and origin not in self.server.allowed_origins:
            return self._json(403, {"error": f"requests from {origin} are not allowed (see --allowed_origins)"})
        if self.headers.get_content_type() != "application/json":
            return self._json(415, {"error": "the request must be application/json"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            return self._json(413, {"error": f"the request must be at most {MAX_BODY_BYTES} bytes"})
        body = self.rfile.read(length)
        if len(body) < length:
            return self._json(400, {"error": f"the request body ended after {len(body)} of {length} bytes"})
        try:
            req = parse_chat_request(body)
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
        gone, done = threading.Event(), threading.Event()
        watcher = threading.Thread(target=watch_disconnect, args=(self.connection, done, gone), daemon=True)
        watcher.start()
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
                cancel=gone,
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
        except (ClientCancelled, BrokenPipeError, ConnectionResetError, TimeoutError):
            return  # the page went away: the request on the Triton server was cancelled on the way out
        except Exception as e:  # noqa: BLE001 - any failure is this request's error, never the server's
            if gone.is_set():
                return
            if not isinstance(e, MGMError):
                log.exception("mgm-web: a chat request failed")
            message = str(e) if isinstance(e, MGMError) else f"internal error ({type(e).__name__})"
            try:
                self._event("error", {"message": message})
            except OSError:
                pass
        finally:
            done.set()


def watch_disconnect(sock: socket.socket, done: threading.Event, gone: threading.Event) -> None:
    """Set `gone` when the peer closes `sock` (readable with nothing to read) before `done` is set.

    The request body has been read, so the socket only turns readable again at EOF (or if the client
    pipelines another request, which means it is still there: then watching stops)."""
    while not done.is_set():
        try:
            readable, _, _ = select.select([sock], [], [], DISCONNECT_POLL_S)
            if not readable:
                continue
            still_there = bool(sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            continue
        except (OSError, ValueError):  # reset, or closed under us
            still_there = False
        if not still_there:
            gone.set()
        return


class DemoServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them; connections beyond that get a 503
    from one refusing thread (and are closed unanswered if even its queue is full)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: a burst of connects waits here, not in SYN retries

    def __init__(
        self,
        address: tuple[str, int],
        demo: WebDemo,
        verbose: bool = False,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        allowed_origins: tuple[str, ...] = (),
    ):
        if max_connections < 1:
            raise MGMError(f"--max_connections must be >= 1, got {max_connections}")
        self.demo, self.verbose, self.socket_timeout_s = demo, verbose, socket_timeout_s
        self.slots = threading.BoundedSemaphore(max_connections)
        self.refusals: queue.Queue = queue.Queue(maxsize=REFUSAL_BACKLOG)  # sockets only, no thread each
        super().__init__(address, Handler)
        host, port = self.server_address[:2]
        own = {f"http://{name}:{port}" for name in (host, "127.0.0.1", "localhost")}
        self.allowed_origins = frozenset(own | {o.rstrip("/") for o in allowed_origins})
        threading.Thread(target=self._refuse_loop, name="mgm-web-refuse", daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                self.refusals.put_nowait(request)
            except queue.Full:
                self.shutdown_request(request)
            return
        threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True).start()

    def _serve_one(self, request, client_address) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse_loop(self) -> None:
        body = json.dumps({"error": "mgm-web is busy: too many connections; try again"}).encode()
        answer = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        while True:
            sock = self.refusals.get()
            try:
                sock.setblocking(False)
                try:
                    sock.recv(65536)  # what has arrived: closing on unread data would reset the answer
                except OSError:
                    pass
                sock.settimeout(0.5)
                sock.sendall(answer)
            except OSError:
                pass
            finally:
                self.shutdown_request(sock)


def make_server(
    demo: WebDemo,
    host: str = "127.0.0.1",
    port: int = 7860,
    verbose: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    allowed_origins: tuple[str, ...] = (),
) -> DemoServer:
    """A bound server (port 0 picks a free one); call serve_forever(), and shutdown() to stop."""
    return DemoServer((host, port), demo, verbose, max_connections, socket_timeout_s, allowed_origins)


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
    p.add_argument(
        "--allowed_origins",
        nargs="*",
        default=[],
        metavar="ORIGIN",
        help="other origins whose pages may POST /api/chat, e.g. http://myhost:7860 when bound to 0.0.0.0 "
        "(default: this server's own origin only)",
    )
    p.add_argument(
        "--max_connections", type=int, default=DEFAULT_MAX_CONNECTIONS, help="connections served at once (503 above)"
    )
    p.add_argument(
        "--socket_timeout",
        type=float,
        default=DEFAULT_SOCKET_TIMEOUT_S,
        help="seconds any one read or write of a connection may take",
    )
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    args = p.parse_args(argv)
    return run_cli("mgm-web", lambda: serve(args), debug=args.debug)


def serve(args: argparse.Namespace) -> int:
    url = args.triton_url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    model = f"{args.model_name}_{args.model}" if args.model_name else args.model
    demo = WebDemo(url, args.protocol, model, args.sd_model, args.timeout)
    try:
        server = make_server(
            demo,
            args.host,
            args.port,
            args.verbose,
            args.max_connections,
            args.socket_timeout,
            tuple(args.allowed_origins),
        )
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
