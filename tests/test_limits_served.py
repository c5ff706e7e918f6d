"""The request limits on a real tritonserver (CPU), past the client's own checks: max_tokens by its
name before vision, megabytes of text refused by their bytes at once, failures and cancellations of
the decoupled models on the metrics port, and what Triton's HTTP does with malformed JSON."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from client.mgm_client import ClientError, MGMClient
from tests.helpers.images import png, random_image

pytestmark = pytest.mark.server
IMAGE = png(random_image(64, 48, seed=5))


def raw(served, model: str, prompt: str, max_tokens: int, protocol: str = "grpc") -> list[dict]:
    """One request straight to the server (no client-side limit checks)."""
    client = MGMClient(
        served.server.grpc_url if protocol == "grpc" else served.server.http_url,
        protocol=protocol,
        model=model,
        timeout_s=120,
    )
    tensors = {
        "text_input": np.array([prompt.encode()], dtype=np.object_),
        "max_tokens": np.array([max_tokens], np.int32),
        "image_input": np.frombuffer(IMAGE, np.uint8),
    }
    if model == "mgm_bls":
        tensors["stream"] = np.array([False])
    source = client._grpc(tensors) if protocol == "grpc" else client._http(tensors, stream=False)
    return list(source)


def metric(served, name: str, **labels) -> float:
    text = urllib.request.urlopen(served.server.metrics_url, timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("model", ["ensemble", "mgm_bls"])
def test_max_tokens_0_is_refused_by_its_name(served_llama, model):
    before = metric(served_llama, "mgm_request_failures_total", model="mgm_bls", reason="invalid_input")
    for max_tokens in (0, -2):
        with pytest.raises(ClientError) as e:
            raw(served_llama, model, "What is it?", max_tokens)
        assert f"max_tokens must be at least 1, got {max_tokens}" in str(e.value)
        assert "REQUEST_OUTPUT_LEN" not in str(e.value) and "request_output_len" not in str(e.value)
    if model == "mgm_bls":  # a decoupled model's errors, counted where an operator can alert on them
        after = metric(served_llama, "mgm_request_failures_total", model="mgm_bls", reason="invalid_input")
        assert after == before + 2


def test_16_mb_of_text_is_refused_in_a_moment(served_llama):
    start = time.perf_counter()
    with pytest.raises(ClientError, match="bytes; at most 262144 bytes can fit max_input_len 2048"):
        raw(served_llama, "mgm_bls", "word " * (16 << 18), 4)
    assert time.perf_counter() - start < 5  # it took 29 s and 4.6 GB when it was tokenised first
    assert raw(served_llama, "mgm_bls", "What is it?", 2)  # and the server still answers


def test_a_cancelled_stream_is_counted(served_llama):
    import tritonclient.grpc as grpcclient

    before = metric(served_llama, "mgm_request_cancellations_total", model="mgm_bls")
    inputs = []
    for name, value in {
        "text_input": np.array([[b"Tell me a long story."]], dtype=np.object_),
        "max_tokens": np.array([[400]], np.int32),
        "stream": np.array([[True]]),
    }.items():
        inp = grpcclient.InferInput(
            name, list(value.shape), {np.int32: "INT32", np.bool_: "BOOL"}.get(value.dtype.type, "BYTES")
        )
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    got = []
    client = grpcclient.InferenceServerClient(served_llama.server.grpc_url)
    client.start_stream(callback=lambda result, error: got.append((result, error)))
    client.async_stream_infer("mgm_bls", inputs)
    deadline = time.monotonic() + 60
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 30
    while metric(served_llama, "mgm_request_cancellations_total", model="mgm_bls") == before:
        assert time.monotonic() < deadline, "the cancellation was never counted"
        time.sleep(0.2)


def test_malformed_json_to_tritons_own_http_is_answered_by_triton(served_llama):
    """Not our code: Triton's HTTP frontend parses the generate body. It answers with an error status
    and a JSON message (500 from the tritonserver this suite runs: recorded here, so a change of its behaviour shows)."""
    req = urllib.request.Request(
        f"http://{served_llama.server.http_url}/v2/models/mgm_bls/generate",
        data=b'{"text_input": "Hi", "max_tokens": ',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    body = e.value.read()
    print(f"Triton answers malformed JSON with {e.value.code}: {body[:200]!r}")
    assert 400 <= e.value.code < 600 and "error" in json.loads(body)
