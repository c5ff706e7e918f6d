"""mgm-web under hostile or broken clients, and the client library's cancellation, without a Triton
server (a fake client stands in for MGMClient): bounded threads, an HTTP answer for every malformed
request, same-origin POSTs only, and a page that goes away cancels the request behind it."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest

from client.mgm_client import Answer, ClientCancelled, MGMClient
from client.web.server import MAX_BODY_BYTES, WebDemo, make_server
from mgm_ref.constants import MAX_IMAGE_BYTES, MAX_IMAGES_PER_REQUEST, MAX_TEXT_BYTES
from tests.helpers.images import png, random_image

IMAGE = png(random_image(32, 24, seed=3))


class FakeClient:
    """Answers "fine" at once, or (`hold`) waits until its `cancel` event is set, up to 10 s."""

    def __init__(self, log: list, hold: bool):
        self.log, self.hold = log, hold

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        pass

    def stream_answer(self, prompt, images=(), on_delta=None, cancel=None, **kwargs):
        if self.hold:
            start = time.monotonic()
            got = cancel.wait(10) if cancel is not None else time.sleep(10)
            self.log.append(("cancelled" if got else "ran to the end", time.monotonic() - start))
            if got:
                raise ClientCancelled("cancelled")
        on_delta("fine")
        return Answer(text="fine", output_tokens=1)


class FakeDemo(WebDemo):
    def __init__(self, hold: bool = False):
        super().__init__("127.0.0.1:1")
        self.log: list = []
        self.hold = hold

    def client(self):
        return FakeClient(self.log, self.hold)


@pytest.fixture
def web(request):
    hold = getattr(request, "param", False)
    server = make_server(FakeDemo(hold), port=0)
    server.socket_timeout_s = 1.0  # ignored by a server without socket timeouts
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def body(**extra) -> bytes:
    req = {"question": "What is it?", "images": [base64.b64encode(IMAGE).decode()], "max_tokens": 4}
    req.update(extra)
    return json.dumps(req).encode()


def post(web, data: bytes, headers: dict | None = None) -> bytes:
    head = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    raw = "POST /api/chat HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    return exchange(web, raw.encode() + data)


def exchange(web, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes; read one answer (to its Content-Length, else until the server closes; b"" if
    it closed without a word)."""
    with socket.create_connection(web.server_address[:2], timeout=timeout) as sock:
        sock.sendall(payload)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
            head, sep, rest = answer.partition(b"\r\n\r\n")
            length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if sep and length and len(rest) >= int(length[0].split(b":")[1]):
                break
    except ConnectionResetError:
        pass
    return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


def error_of(answer: bytes) -> str:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


# ---- bounded threads and sockets --------------------------------------------------------------------
def test_300_half_open_connections_do_not_become_300_threads(web):
    baseline = threading.active_count()
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(web.server_address[:2], timeout=10)
            s.sendall(b"POST /api/chat HTTP/1.1\r\nContent-Le")  # and never the rest
            socks.append(s)
        time.sleep(0.5)
        assert threading.active_count() - baseline <= 40  # the connection cap (32) and the refusing thread
        # each one gets an answer: 503 beyond the cap, 408 once its read times out
        statuses = set()
        for s in socks:
            statuses.add(status_of(read_answer(s)))
        assert statuses <= {408, 503} and 408 in statuses
    finally:
        for s in socks:
            s.close()
    assert status_of(exchange(web, b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


# ---- every malformed request gets an answer ---------------------------------------------------------
@pytest.mark.parametrize(
    "payload,status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"POST /api/chat HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{", 408),
        (b"POST /api/chat HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: x\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ],
)
def test_a_malformed_request_gets_an_http_answer(web, payload, status):
    answer = exchange(web, payload)
    assert status_of(answer) == status and error_of(answer)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (body(max_tokens=1e999), "max_tokens must be a number"),
        (body(max_tokens=0), "max_tokens must be at least 1"),
        (body(max_tokens={"a": 1}), "max_tokens must be a number"),
        (body(temperature=[1]), "temperature must be a number"),
        (body(images=["x"] * (MAX_IMAGES_PER_REQUEST + 1)), f"at most {MAX_IMAGES_PER_REQUEST} images"),
        (body(question="a" * (MAX_TEXT_BYTES + 1)), f"the limit is {MAX_TEXT_BYTES}"),
    ],
)
def test_bad_json_is_a_400_with_a_reason(web, data, message):
    answer = post(web, data)
    assert status_of(answer) == 400 and message in error_of(answer)
    assert "object at 0x" not in error_of(answer) and "{'a'" not in error_of(answer)


def test_images_outside_the_shared_limits_are_refused_by_name(web):
    from PIL import Image

    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, "BMP")
    answer = post(web, body(images=[base64.b64encode(bmp.getvalue()).decode()]))
    assert status_of(answer) == 400 and "BMP; accepted formats: JPEG, PNG, WEBP" in error_of(answer)
    big = base64.b64encode(IMAGE + b"\0" * MAX_IMAGE_BYTES).decode()
    answer = post(web, body(images=[big]))
    assert status_of(answer) == 400 and f"the limit is {MAX_IMAGE_BYTES}" in error_of(answer)
    assert MAX_BODY_BYTES >= MAX_IMAGES_PER_REQUEST * MAX_IMAGE_BYTES * 4 // 3 + MAX_TEXT_BYTES


# ---- same origin only ----------------------------------------------------------------------------------
def test_chat_takes_json_from_its_own_origin_only(web):
    host, port = web.server_address[:2]
    assert status_of(post(web, body(), {"Origin": "http://evil.example"})) == 403
    assert status_of(post(web, body(), {"Origin": "null"})) == 403
    assert status_of(post(web, body(), {"Content-Type": "text/plain"})) == 415  # a cross-site form's type
    for origin in (f"http://{host}:{port}", f"http://localhost:{port}"):
        assert status_of(post(web, body(), {"Origin": origin})) == 200
    assert status_of(post(web, body())) == 200  # not a browser: no Origin header


def test_allowed_origins_are_configurable():
    server = make_server(FakeDemo(), port=0, allowed_origins=("http://myhost:7860/",))
    try:
        assert "http://myhost:7860" in server.allowed_origins
    finally:
        server.server_close()


# ---- a page that goes away cancels its request --------------------------------------------------------
@pytest.mark.parametrize("web", [True], indirect=True)
def test_a_page_that_goes_away_cancels_the_request_behind_it(web):
    data = body()
    head = f"POST /api/chat HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection(web.server_address[:2], timeout=10) as sock:
        sock.sendall(head.encode() + data)
        seen = b""
        while b"event: question" not in seen:
            seen += sock.recv(65536)
    deadline = time.monotonic() + 5
    while not web.demo.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert web.demo.log and web.demo.log[0][0] == "cancelled" and web.demo.log[0][1] < 3


class FakeGrpcServer:
    """tritonclient.grpc.InferenceServerClient that starts a stream and never answers."""

    stopped: list = []

    def __init__(self, url, *args, **kwargs):
        pass

    def start_stream(self, callback, stream_timeout=None):
        self.callback = callback

    def async_stream_infer(self, *args, **kwargs):
        pass

    def stop_stream(self, cancel_requests=False):
        FakeGrpcServer.stopped.append(cancel_requests)

    def close(self):
        pass


def test_the_client_cancels_its_grpc_stream_when_asked(monkeypatch):
    import tritonclient.grpc

    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", FakeGrpcServer)
    FakeGrpcServer.stopped = []
    cancel, outcome = threading.Event(), []

    def ask():
        try:
            MGMClient("127.0.0.1:1", timeout_s=30).stream_answer("Hi?", max_tokens=4, cancel=cancel)
        except ClientCancelled as e:
            outcome.append(e)

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.3)
    cancel.set()
    thread.join(2)
    assert not thread.is_alive() and outcome and FakeGrpcServer.stopped == [True]


def test_the_client_checks_the_shared_limits_before_sending():
    from client.cli import check_image
    from client.mgm_client import ClientError, RequestSpec

    with pytest.raises(ClientError, match=f"at most {MAX_IMAGES_PER_REQUEST}"):
        RequestSpec("Hi", [IMAGE] * (MAX_IMAGES_PER_REQUEST + 1)).check_limits()
    with pytest.raises(ClientError, match=f"the limit is {MAX_IMAGE_BYTES}"):
        RequestSpec("Hi", [b"\0" * (MAX_IMAGE_BYTES + 1)]).check_limits()
    with pytest.raises(ClientError, match=f"the limit is {MAX_TEXT_BYTES}"):
        RequestSpec("Hi", history=[("a" * MAX_TEXT_BYTES, "b")]).check_limits()
    with pytest.raises(ClientError, match="max_tokens must be at least 1"):
        MGMClient("127.0.0.1:1").generate("Hi", max_tokens=0)  # refused before connecting
    from PIL import Image

    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    with pytest.raises(ClientError, match="GIF; accepted formats"):
        check_image(gif.getvalue(), "cat.gif")
    assert check_image(IMAGE, "ok.png") == IMAGE
