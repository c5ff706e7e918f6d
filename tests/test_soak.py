"""Bounded soak: concurrent mixed clients over every client path; answers stay solo answers, no errors.

8 clients (MGM_SOAK_CLIENTS) for 60 s (MGM_SOAK_S) mix `mgm_bls` (streaming and whole, gRPC and HTTP)
and `ensemble` (gRPC and HTTP), with and without images. Every answer must equal the greedy answer of
mgm_ref for the same request alone, no request may fail, and the server must stay up and ready.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.images import png, random_image

pytestmark = pytest.mark.server

SOAK_S = float(os.environ.get("MGM_SOAK_S", "60"))
CLIENTS = int(os.environ.get("MGM_SOAK_CLIENTS", "8"))
MAX_TOKENS = int(os.environ.get("MGM_SOAK_TOKENS", "16"))

# (model, protocol, streaming); "tensorrt_llm" is the LLM model called directly with prompt ids
PATHS = [
    ("mgm_bls", "grpc", True),
    ("mgm_bls", "grpc", False),
    ("mgm_bls", "http", True),
    ("mgm_bls", "http", False),
    ("ensemble", "grpc", False),
    ("ensemble", "http", False),
    ("tensorrt_llm", "grpc", True),
]
TEXT_PROMPT = "Tell me a story."


def direct_llm_inputs(ids: list[int], end_id: int, max_tokens: int) -> list:
    """gRPC inputs of a streamed text-only request to the `tensorrt_llm` model itself."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    tensors = {
        "input_ids": np.array([ids], np.int32),
        "input_lengths": np.array([[len(ids)]], np.int32),
        "request_output_len": np.array([[max_tokens]], np.int32),
        "end_id": np.array([[end_id]], np.int32),
        "streaming": np.array([[True]]),
    }
    inputs = []
    for name, value in tensors.items():
        inp = grpcclient.InferInput(name, list(value.shape), "BOOL" if value.dtype == bool else "INT32")
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    return inputs


def direct_llm_tokens(url: str, ids: list[int], end_id: int, max_tokens: int) -> list[int]:
    """Stream a text-only prompt through the `tensorrt_llm` model itself; the ids it produced."""
    import queue

    import tritonclient.grpc as grpcclient

    inputs = direct_llm_inputs(ids, end_id, max_tokens)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    out: list[int] = []
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("tensorrt_llm", inputs, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise RuntimeError(str(error))
            ids_out = result.as_numpy("output_ids")
            if ids_out is not None:
                out.extend(ids_out.reshape(-1).tolist())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream(cancel_requests=True)  # without: a stream the server never ends blocks here
        client.close()


def _jobs():
    jobs = [("Say something.", [])]
    for k in range(3):
        jobs.append((f"Question {k}: what is in the picture?", [png(random_image(260 + 40 * k, 200, seed=40 + k))]))
    return jobs


def test_soak_mixed_clients_get_solo_answers(served_llama):
    served = served_llama
    jobs = _jobs()
    expected = [served.expected(q, imgs, max_tokens=MAX_TOKENS)[0] for q, imgs in jobs]
    from mgm_ref.conversation import build_prompt
    from mgm_ref.model import GenerationParams

    ref = served.ref
    prompt_ids = ref.tokenize(build_prompt(ref.conv_mode, TEXT_PROMPT, 0))
    end_id = ref.stop_token_ids()[0]
    expected_ids = ref.generate([prompt_ids], None, GenerationParams(max_new_tokens=MAX_TOKENS, temperature=0))[0]
    from triton_models.launcher.supervise import live_stubs

    stubs_before = {s.instance for s in live_stubs(served.server.pid).values()}
    deadline = time.monotonic() + SOAK_S
    done: Counter = Counter()
    errors: list[str] = []
    mismatches: list[str] = []
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        turn = worker
        while time.monotonic() < deadline:
            model, protocol, stream = PATHS[turn % len(PATHS)]
            job = (turn // len(PATHS) + worker) % len(jobs)
            turn += 1
            prompt, images = jobs[job]
            try:
                if model == "tensorrt_llm":
                    got = direct_llm_tokens(served.server.grpc_url, prompt_ids, end_id, MAX_TOKENS)
                    with lock:
                        done[(model, protocol, stream)] += 1
                        if got[: len(expected_ids)] != list(expected_ids):
                            mismatches.append(f"tensorrt_llm direct: {got} != {list(expected_ids)}")
                    continue
                client = served.client(protocol, model=model)
                call = client.stream_answer if stream else client.generate
                text = call(prompt, images, max_tokens=MAX_TOKENS, temperature=0.0).text
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported below
                with lock:
                    errors.append(f"{model}/{protocol}/stream={stream}: {type(e).__name__}: {e}")
                continue
            with lock:
                done[(model, protocol, stream)] += 1
                if text.strip() != expected[job]:
                    mismatches.append(f"{model}/{protocol}/stream={stream} job {job}: {text!r} != {expected[job]!r}")

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client_loop, range(CLIENTS)))

    total = sum(done.values())
    print(
        f"soak: {total} answers in {SOAK_S:.0f} s by {CLIENTS} clients, {len(errors)} errors, "
        f"{len(mismatches)} mismatches; per path {dict(done)}; first mismatches {mismatches[:2]}"
    )
    stubs_after = {s.instance for s in live_stubs(served.server.pid).values()}
    assert stubs_after == stubs_before, f"python-backend stubs died: {sorted(stubs_before - stubs_after)}"
    assert not errors, f"{len(errors)} of {total + len(errors)} requests failed, first: {errors[:3]}"
    assert not mismatches, mismatches[:3]
    assert set(done) == set(PATHS), f"paths never exercised: {set(PATHS) - set(done)}"
    assert served.server.is_ready(), "tritonserver is not ready after the soak"
    # readiness does not notice a dead python-backend stub; its log does
    assert "is not healthy" not in served.server.log and "Segmentation fault" not in served.server.log
    # the server still answers after the load
    assert served.client().generate(*jobs[1], max_tokens=MAX_TOKENS).text.strip() == expected[1]
