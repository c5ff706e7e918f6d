"""SIGTERM to `mgm-serve` on the served tiny MGM while answers are being generated through the
ensemble and the BLS: every answer in flight completes (and equals mgm_ref's), new work is
refused, mgm-serve exits 0 and its /dev/shm regions are gone.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mgm_ref.loader import load_model
from tests.helpers.images import png, random_image
from tests.helpers.served import Served as Oracle
from tests.test_supervision import Served
from triton_models.launcher import shm

pytestmark = pytest.mark.server

MAX_TOKENS = 96


def test_sigterm_drains_ensemble_and_bls_answers_in_flight(tiny_checkpoints, tmp_path):
    from client.cpu_repo import prepare_cpu_repo
    from client.mgm_client import MGMClient

    ckpt = tiny_checkpoints("llama")
    _, repo = prepare_cpu_repo(ckpt, tmp_path / "work", max_batch_size=8, log=lambda m: None)
    oracle = Oracle.__new__(Oracle)  # only its mgm_ref answer; the server here is mgm-serve's
    oracle.ref = load_model(ckpt)
    image = png(random_image(300, 220, seed=7))
    expected = oracle.expected("What is in the picture?", [image], max_tokens=MAX_TOKENS)[0]

    served = Served(tmp_path, repo=repo, ready_timeout=300)
    grpc_url, http_url = served.grpc_url, f"127.0.0.1:{served.ports[0]}"
    streaming = threading.Event()

    def ask(model: str, protocol: str, stream: bool) -> str:
        client = MGMClient(grpc_url if protocol == "grpc" else http_url, protocol=protocol, model=model, timeout_s=120)
        try:
            if stream:
                answer = client.stream_answer(
                    "What is in the picture?", [image], on_delta=lambda _: streaming.set(), max_tokens=MAX_TOKENS
                )
            else:
                answer = client.generate("What is in the picture?", [image], max_tokens=MAX_TOKENS)
            return answer.text.strip()
        except Exception as exc:  # noqa: BLE001 - a cut answer is the finding; compared below
            return f"{type(exc).__name__}: {exc}"

    paths = [("mgm_bls", "grpc", True), ("ensemble", "grpc", False), ("ensemble", "http", False)]
    with ThreadPoolExecutor(len(paths)) as pool:
        futures = [pool.submit(ask, *path) for path in paths]
        assert streaming.wait(120), "no streamed piece arrived"
        regions = len(shm.regions(served.shm_prefix))
        asked = time.monotonic()
        served.cli.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = ask("mgm_bls", "grpc", False)
        answers = [f.result() for f in futures]
    code = served.finish(timeout=90)
    exit_s = time.monotonic() - asked
    print(
        f"SIGTERM with {len(paths)} answers in flight: exit {code} after {exit_s:.1f} s; late request: {late[:120]!r}"
    )
    for path, answer in zip(paths, answers, strict=True):
        assert answer == expected, f"{path}: {answer[:300]!r}"
    assert late != expected and "mgm_bls" in late, late  # refused, not answered
    assert code == 0, served.report()
    assert regions > 0 and shm.regions(served.shm_prefix) == [], "shm regions left behind"
