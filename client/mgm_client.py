"""Client library for an MGM Triton server (gRPC or HTTP), used by mgm-client, mgm-bench and the demo.

    client = MGMClient("localhost:8001")                   # gRPC; "localhost:8000", protocol="http"
    answer = client.generate("What is this?", images=["cat.jpg"], max_tokens=64)
    for delta in client.stream("Describe it.", images=["cat.jpg"]):
        print(delta, end="", flush=True)

Requests go to the streaming BLS model `mgm_bls` (or `ensemble`, which gives one answer). Both are
decoupled, so gRPC uses the streaming RPC even for one answer and HTTP uses the generate extension
(`/generate`, `/generate_stream`): plain `/infer` does not serve decoupled models.
"""

from __future__ import annotations

import json
import os
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgm_ref.constants import MAX_HTTP_REQUEST_BYTES, MAX_IMAGE_BYTES, MAX_IMAGES_PER_REQUEST, MAX_TEXT_BYTES
from mgm_ref.errors import MGMError
from triton_models.launcher.argv import INFERENCE_HEADER, INFERENCE_KEY_ENV


class ClientError(MGMError, RuntimeError):
    """The server is unreachable, not ready, or answered with an error (its message is kept)."""


class ClientCancelled(ClientError):
    """The caller set the `cancel` event: the request was cancelled on the server too."""


CANCEL_POLL_S = 0.2  # how often a waiting call looks at its `cancel` event


@dataclass
class Answer:
    text: str
    output_tokens: int = 0
    ttft_ms: float = 0.0  # server-side, from the BLS
    latency_s: float = 0.0  # client-side, whole request
    client_ttft_s: float | None = None  # client-side, first streamed text
    chunks: list[str] = field(default_factory=list)


def read_image(image: str | Path | bytes) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    try:
        return Path(image).read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read image {image}: {e.strerror or e}") from None


@dataclass
class RequestSpec:
    prompt: str
    images: Sequence[str | Path | bytes] = ()
    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    conv_mode: str | None = None
    history: Sequence[tuple[str, str]] | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        """Client tensor name -> value without the batch dim (the model's input interface)."""
        blobs = [read_image(i) for i in self.images]
        out: dict[str, np.ndarray] = {
            "text_input": np.array([self.prompt.encode()], dtype=np.object_),
            "max_tokens": np.array([self.max_tokens], np.int32),
        }
        if blobs:
            out["image_input"] = np.frombuffer(b"".join(blobs), np.uint8)
            if len(blobs) > 1:
                out["image_sizes"] = np.array([len(b) for b in blobs], np.int32)
        optional = {
            "temperature": (self.temperature, np.float32),
            "top_p": (self.top_p, np.float32),
            "top_k": (self.top_k, np.int32),
            "seed": (self.seed, np.uint64),
        }
        for name, (value, dtype) in optional.items():
            if value is not None:
                out[name] = np.array([value], dtype)
        if self.conv_mode:
            out["conv_mode"] = np.array([self.conv_mode.encode()], dtype=np.object_)
        if self.history:
            out["history"] = np.array([json.dumps([list(t) for t in self.history]).encode()], dtype=np.object_)
        return out

    def check_limits(self) -> None:
        """The limits every server shares (mgm_ref.constants), checked by MGMClient before anything is
        sent (tensors() does not: a front door building tensors keeps its own checks and error codes).
        The server's own limits may be lower (images and text per its context) and say so in its error."""
        blobs = [read_image(i) for i in self.images]
        if len(blobs) > MAX_IMAGES_PER_REQUEST:
            raise ClientError(f"{len(blobs)} images given; a request carries at most {MAX_IMAGES_PER_REQUEST}")
        for k, blob in enumerate(blobs):
            if len(blob) > MAX_IMAGE_BYTES:
                raise ClientError(f"image #{k + 1} is {len(blob)} bytes; the limit is {MAX_IMAGE_BYTES}")
        texts = [self.prompt, *(t for turn in self.history or () for t in turn)]
        size = sum(len(t.encode()) for t in texts)
        if size > MAX_TEXT_BYTES:
            raise ClientError(f"the question and history are {size} bytes; the limit is {MAX_TEXT_BYTES}")
        if self.max_tokens < 1:
            raise ClientError(f"max_tokens must be at least 1, got {self.max_tokens}")


class MGMClient:
    """`http_inference_key` (default: $MGM_HTTP_INFERENCE_KEY) is sent with HTTP requests to a server
    started with `mgm-serve --restrict_http_inference`."""

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: str = "grpc",
        model: str = "mgm_bls",
        timeout_s: float = 600.0,
        http_inference_key: str | None = None,
    ):
        if protocol not in ("grpc", "http"):
            raise ClientError(f"protocol must be grpc or http, got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout_s = url, protocol, model, timeout_s
        key = http_inference_key or os.environ.get(INFERENCE_KEY_ENV)
        self.http_headers = {INFERENCE_HEADER: key} if key else {}

    # ---- health -------------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                if self._model_ready():
                    return
                last = f"model {self.model!r} is not ready"
            except Exception as e:  # noqa: BLE001 - connection refused and friends
                last = f"cannot reach the server at {self.url} ({type(e).__name__}: {e})"
            time.sleep(0.2)
        raise ClientError(last)

    def _model_ready(self) -> bool:
        if self.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            return grpcclient.InferenceServerClient(self.url).is_model_ready(self.model)
        with urllib.request.urlopen(f"http://{self.url}/v2/models/{self.model}/ready", timeout=5) as r:
            return r.status == 200

    # ---- generation ---------------------------------------------------------------------------
    # `cancel` (a threading.Event) set by another thread ends the call with ClientCancelled and cancels
    # the request on the server: gRPC cancels the stream at once (Triton cancels the request); HTTP
    # closes the connection at the next piece of the answer.
    def generate(self, prompt: str, images=(), cancel=None, **kwargs) -> Answer:
        """One whole answer (the server still streams internally; this waits for the end)."""
        return self._run(RequestSpec(prompt, images, **kwargs), stream=False, cancel=cancel)

    def stream(self, prompt: str, images=(), cancel=None, **kwargs) -> Iterator[str]:
        """Text deltas as the server produces them."""
        answer_box: list[Answer] = []
        yield from self._iter(RequestSpec(prompt, images, **kwargs), True, answer_box, cancel)

    def stream_answer(self, prompt: str, images=(), on_delta=None, cancel=None, **kwargs) -> Answer:
        """Stream, calling on_delta(text) per chunk, and return the whole Answer with timings."""
        return self._run(RequestSpec(prompt, images, **kwargs), stream=True, on_delta=on_delta, cancel=cancel)

    def _run(self, spec: RequestSpec, stream: bool, on_delta=None, cancel=None) -> Answer:
        box: list[Answer] = []
        for delta in self._iter(spec, stream, box, cancel):
            if on_delta:
                on_delta(delta)
        return box[0]

    def _iter(self, spec: RequestSpec, stream: bool, answer_box: list, cancel=None) -> Iterator[str]:
        spec.check_limits()
        tensors = spec.tensors()
        if self.model.endswith("mgm_bls"):  # also a named variant's NAME_mgm_bls
            tensors["stream"] = np.array([stream])
        start = time.perf_counter()
        answer = Answer(text="")
        source = self._grpc(tensors, cancel) if self.protocol == "grpc" else self._http(tensors, stream, cancel)
        for out in source:
            text = out.get("text_output", "")
            if text and answer.client_ttft_s is None:
                answer.client_ttft_s = time.perf_counter() - start
            answer.output_tokens = int(out.get("output_token_count", answer.output_tokens))
            answer.ttft_ms = float(out.get("time_to_first_token_ms", answer.ttft_ms))
            if text:
                answer.chunks.append(text)
                yield text
        answer.text = "".join(answer.chunks)
        answer.latency_s = time.perf_counter() - start
        answer_box.append(answer)

    def _grpc(self, tensors: dict[str, np.ndarray], cancel=None) -> Iterator[dict]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        inputs = []
        for name, value in tensors.items():
            inp = grpcclient.InferInput(name, [1, *value.shape], np_to_triton_dtype(value.dtype))
            inp.set_data_from_numpy(value[None])
            inputs.append(inp)
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        try:
            client.start_stream(
                callback=lambda result, error: results.put((result, error)), stream_timeout=self.timeout_s
            )
            client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            while True:
                result, error = self._next_result(results, cancel)
                if error is not None:
                    raise ClientError(_message(error))
                yield _outputs(result)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
        except InferenceServerException as e:
            message = _message(e)
            if "no longer in valid state" in message or "failed to connect" in message.lower():
                message = f"cannot reach the server at {self.url} over gRPC ({message})"
            raise ClientError(message) from None
        finally:
            try:
                client.stop_stream(cancel_requests=True)
            finally:
                client.close()

    def _next_result(self, results: queue.Queue, cancel) -> tuple:
        """The next (result, error) of the stream, looking at `cancel` while it waits."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            if cancel is not None and cancel.is_set():
                raise ClientCancelled("the request was cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"no answer from {self.url} within {self.timeout_s:.0f} s")
            try:
                return results.get(timeout=min(left, CANCEL_POLL_S) if cancel is not None else left)
            except queue.Empty:
                continue

    def _http(self, tensors: dict[str, np.ndarray], stream: bool, cancel=None) -> Iterator[dict]:
        body = {
            name: (value.tolist() if value.dtype != np.object_ else value[0].decode())
            for name, value in tensors.items()
        }
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stream"):
            if name in body:
                body[name] = body[name][0]
        endpoint = "generate_stream" if stream else "generate"
        data = json.dumps(body).encode()
        if len(data) > MAX_HTTP_REQUEST_BYTES:  # JSON spells each image byte as a number: gRPC carries more
            raise ClientError(
                f"the request is {len(data)} bytes as JSON; HTTP takes at most {MAX_HTTP_REQUEST_BYTES} "
                "(use --protocol grpc for large images)"
            )
        req = urllib.request.Request(
            f"http://{self.url}/v2/models/{self.model}/{endpoint}",
            data=data,
            headers={"Content-Type": "application/json", **self.http_headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                if not stream:
                    yield _http_outputs(json.loads(resp.read()))
                    return
                for raw in resp:
                    if cancel is not None and cancel.is_set():
                        raise ClientCancelled("the request was cancelled")  # leaving closes the connection
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        yield _http_outputs(json.loads(line[5:]))
        except urllib.error.HTTPError as e:
            raise ClientError(_http_error(e)) from None
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach the server at {self.url}: {e.reason}") from None


def _outputs(result) -> dict:
    out = {}
    for name in ("text_output", "output_token_count", "time_to_first_token_ms"):
        value = result.as_numpy(name)
        if value is not None:
            v = value.reshape(-1)[0]
            out[name] = v.decode() if isinstance(v, bytes) else v.item()
    return out


def _http_outputs(obj: dict) -> dict:
    if "error" in obj:
        raise ClientError(obj["error"])
    out = {}
    for name in ("text_output", "output_token_count", "time_to_first_token_ms"):
        if name in obj:
            value = obj[name]
            out[name] = value[0] if isinstance(value, list) else value
    return out


def _message(error) -> str:
    msg = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return msg.removeprefix("[StatusCode.INTERNAL] ").removeprefix("[StatusCode.INVALID_ARGUMENT] ")


def _http_error(e) -> str:
    try:
        return json.loads(e.read()).get("error", str(e))
    except Exception:  # noqa: BLE001
        return str(e)
