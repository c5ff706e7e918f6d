"""The served stack on a real tritonserver (CPU): parity with mgm_ref, protocols, concurrency, bad input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from client.mgm_client import ClientError
from tests.helpers.images import png, random_image
from tests.helpers.served import serve

pytestmark = pytest.mark.server
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def llama(served_llama):
    return served_llama


@pytest.fixture(scope="module")
def gemma(tiny_checkpoints, tmp_path_factory):
    yield from serve(tiny_checkpoints, tmp_path_factory, "gemma")


IMAGE = png(random_image(480, 320, seed=11))
QUESTION = "What is in the picture?"


def test_bls_grpc_greedy_matches_reference(llama):
    text, n = llama.expected(QUESTION, [IMAGE])
    for stream in (False, True):
        answer = (llama.client().stream_answer if stream else llama.client().generate)(
            QUESTION, [IMAGE], max_tokens=MAX_TOKENS, temperature=0.0)
        assert answer.text.strip() == text and answer.output_tokens == n
        assert answer.ttft_ms > 0
    assert len(llama.client().stream_answer(QUESTION, [IMAGE], max_tokens=MAX_TOKENS).chunks) > 1


def test_ensemble_and_http_endpoints(llama):
    text, _ = llama.expected(QUESTION, [IMAGE])
    assert llama.client(model="ensemble").generate(QUESTION, [IMAGE], max_tokens=MAX_TOKENS).text == text
    assert llama.client("http", model="ensemble").generate(QUESTION, [IMAGE], max_tokens=MAX_TOKENS).text == text
    assert llama.client("http").generate(QUESTION, [IMAGE], max_tokens=MAX_TOKENS).text == text
    sse = llama.client("http").stream_answer(QUESTION, [IMAGE], max_tokens=MAX_TOKENS)
    assert sse.text.strip() == text and len(sse.chunks) > 1


def test_text_only_multi_image_and_history(llama):
    text, _ = llama.expected("Say something.", [])
    assert llama.client().generate("Say something.", [], max_tokens=MAX_TOKENS).text == text
    two = [IMAGE, png(random_image(200, 300, seed=12))]
    text, _ = llama.expected("Compare the images.", two)
    assert llama.client().generate("Compare the images.", two, max_tokens=MAX_TOKENS).text == text
    answer = llama.client().generate("And the colours?", [IMAGE], max_tokens=4, history=[(QUESTION, "A cat.")])
    assert answer.output_tokens > 0


def test_eight_concurrent_clients_get_their_own_answers(llama):
    jobs = [(f"Question number {k}: what is in the picture?", [png(random_image(300 + 20 * k, 240, seed=k))])
            for k in range(8)]
    expected = [llama.expected(q, imgs)[0] for q, imgs in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: llama.client().stream_answer(job[0], job[1], max_tokens=MAX_TOKENS).text,
                            jobs))
    assert [g.strip() for g in got] == expected


@pytest.mark.parametrize("kwargs,message", [
    (dict(images=[b"not an image at all"]), "cannot decode the image"),
    (dict(prompt="   "), "the prompt is empty"),
    (dict(prompt="<image> and <image>"), "2 <image> tags but 1 images"),
    (dict(prompt="word " * 3000), "max_input_len"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=2.0), "top_p"),
    (dict(max_tokens=0), "max"),
])
def test_bad_requests_get_errors_and_the_server_keeps_serving(llama, kwargs, message):
    request = dict(prompt=QUESTION, images=[IMAGE], max_tokens=MAX_TOKENS)
    request.update(kwargs)
    prompt, images = request.pop("prompt"), request.pop("images")
    for protocol in ("grpc", "http"):
        with pytest.raises(ClientError, match=message):
            llama.client(protocol).generate(prompt, images, **request)
    assert llama.client().generate(QUESTION, [IMAGE], max_tokens=2).output_tokens > 0


def test_oversize_image_is_refused(llama):
    from PIL import Image
    huge = png(Image.new("RGB", (9000, 8000), (1, 2, 3)))
    with pytest.raises(ClientError, match="limit"):
        llama.client().generate(QUESTION, [huge], max_tokens=2)


def test_gemma_parity(gemma):
    text, n = gemma.expected(QUESTION, [IMAGE])
    answer = gemma.client().stream_answer(QUESTION, [IMAGE], max_tokens=MAX_TOKENS)
    assert answer.text.strip() == text and answer.output_tokens == n


def test_hd_parity(tiny_checkpoints, tmp_path_factory):
    for served in serve(tiny_checkpoints, tmp_path_factory, "llama", hd=True):
        text, n = served.expected(QUESTION, [IMAGE])
        answer = served.client().generate(QUESTION, [IMAGE], max_tokens=MAX_TOKENS)
        assert answer.text == text and answer.output_tokens == n
        with pytest.raises(ClientError, match="at most 1"):
            served.client().generate("Compare.", [IMAGE, IMAGE], max_tokens=2)
