"""Queue bounds: with every LLM slot busy and the queue full, a new request is refused at once with a
"server busy" error (UNAVAILABLE) on every path, the requests already admitted finish with
mgm_ref's answer, and the server keeps serving.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from tests.test_soak import direct_llm_inputs, direct_llm_tokens

pytestmark = pytest.mark.server

LONG_TOKENS = 1500  # end_id -1: never stops early, so the slot stays busy for seconds
NO_END = -1


def stream_first_token(url: str, ids: list[int], end_id: int, max_tokens: int, got: queue.Queue) -> None:
    """Like direct_llm_tokens, but reports ('first', t) on the first token and ('done', ids|error)."""
    import tritonclient.grpc as grpcclient

    inputs = direct_llm_inputs(ids, end_id, max_tokens)
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("tensorrt_llm", inputs, enable_empty_final_response=True)
    out: list[int] = []
    try:
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                got.put(("done", str(error)))
                return
            ids_out = result.as_numpy("output_ids")
            if ids_out is not None:
                if not out:
                    got.put(("first", time.monotonic()))
                out.extend(ids_out.reshape(-1).tolist())
            if result.get_response().parameters["triton_final_response"].bool_param:
                got.put(("done", out))
                return
    finally:
        client.stop_stream()
        client.close()


def test_full_queue_refuses_new_work_as_busy(tiny_checkpoints, tmp_path):
    from client.cpu_repo import prepare_cpu_repo
    from client.mgm_client import ClientError, MGMClient
    from mgm_ref.conversation import build_prompt
    from mgm_ref.loader import load_model
    from mgm_ref.model import GenerationParams
    from triton_models.launcher.process import TritonServer
    from triton_models.repo_builder import ServingOptions, build_repo

    ckpt = tiny_checkpoints("llama")
    work = tmp_path / "work"
    prepare_cpu_repo(ckpt, work, max_batch_size=1, log=lambda m: None)  # builds the vision artifact
    (engines,) = (work / "engines").iterdir()
    repo = build_repo(ckpt, engines, work / "repo", "cpu", max_batch_size=1, options=ServingOptions(max_queue_size=1))
    ref = load_model(ckpt)
    ids = ref.tokenize(build_prompt(ref.conv_mode, "Tell me a story.", 0))
    end_id = ref.stop_token_ids()[0]
    expected = list(ref.generate([ids], None, GenerationParams(max_new_tokens=64, temperature=0))[0])

    with TritonServer(repo) as server:
        url = server.grpc_url
        admitted = [queue.Queue(), queue.Queue()]  # one runs in the only slot, one waits in the queue
        threads = [
            threading.Thread(target=stream_first_token, args=(url, ids, NO_END, LONG_TOKENS, q)) for q in admitted
        ]
        threads[0].start()
        assert admitted[0].get(timeout=120)[0] == "first"
        threads[1].start()
        time.sleep(0.2)  # the second one is queued in the engine now
        sent = time.monotonic()
        try:
            direct_llm_tokens(url, ids, end_id, LONG_TOKENS)
            busy_direct = "answered"
        except RuntimeError as exc:
            busy_direct = str(exc)
        direct_s = time.monotonic() - sent
        sent = time.monotonic()
        try:
            MGMClient(url, model="mgm_bls", timeout_s=60).generate("Hi", max_tokens=4)
            busy_bls = "answered"
        except ClientError as exc:
            busy_bls = str(exc)
        bls_s = time.monotonic() - sent
        for thread in threads:
            thread.join(timeout=180)
        answers = []
        for q in admitted:
            while (item := q.get(timeout=5))[0] != "done":
                pass
            answers.append(item[1])
        after = direct_llm_tokens(url, ids, end_id, 8)
    print(f"busy: direct refused in {direct_s:.2f} s ({busy_direct!r}), mgm_bls in {bls_s:.2f} s ({busy_bls!r})")
    assert "server busy" in busy_direct and direct_s < 2, busy_direct
    assert "server busy" in busy_bls and bls_s < 5, busy_bls
    for answer in answers:  # greedy: mgm_ref's answer up to its stop token, then more tokens
        assert answer[: len(expected)] == expected and len(answer) == LONG_TOKENS, "admitted requests must finish"
    assert after == expected[:8]
