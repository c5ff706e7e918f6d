"""mgm-web: the JSON/SSE API against a real server, and the page itself in headless Chromium (Playwright)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from client.web.server import WebDemo, make_server
from tests.helpers.images import OCR_WORDS, png, random_image, text_image

pytestmark = pytest.mark.server
MAX_TOKENS = 8
QUESTION = "What is in the picture?"
IMAGE = png(random_image(480, 320, seed=11))
CHROMIUM = os.environ.get("MGM_CHROMIUM", "/usr/bin/chromium")
# As the machine notes say: without the background-networking flags Chromium keeps dialling out.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def served(served_llama):
    return served_llama


@pytest.fixture(scope="module")
def web(served):
    server = make_server(WebDemo(served.server.grpc_url, timeout_s=120), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def greedy(served, question, image=IMAGE, history=None) -> str:
    """mgm_ref's greedy answer: the oracle the page's answers are checked against."""
    return served.expected(question, [image], MAX_TOKENS, history)[0]


def post_chat(web, body) -> tuple[int, list[tuple[str, dict]]]:
    """(status, events); a 4xx answer gives [("http_error", its JSON)]."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{web.url}/api/chat", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            events, name = [], None
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
            return resp.status, events
    except urllib.error.HTTPError as e:
        return e.code, [("http_error", json.loads(e.read()))]


def chat_body(question=QUESTION, image=IMAGE, **kw):
    body = {
        "question": question,
        "images": ["data:image/png;base64," + base64.b64encode(image).decode()],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    body.update(kw)
    return body


def get(web, path):
    try:
        with urllib.request.urlopen(f"{web.url}{path}", timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------------------------- API


def test_page_assets_and_health(web):
    assert get(web, "/")[0] == 200 and b"MGM" in get(web, "/")[1]
    assert get(web, "/static/app.js")[0] == 200
    for bad in ("/static/../server.py", "/static/", "/nothing", "/static/%2e%2e/server.py"):
        assert get(web, bad)[0] == 404
    status, body = get(web, "/api/health")
    assert status == 200 and json.loads(body)["ready"] is True


def test_chat_streams_the_same_answer_as_the_client_library(served, web):
    expected = greedy(served, QUESTION)
    status, events = post_chat(web, chat_body())
    names = [n for n, _ in events]
    assert status == 200 and names[0] == "question" and names[-1] == "done", events
    deltas = [d["text"] for n, d in events if n == "delta"]
    assert len(deltas) > 1 and "".join(deltas) == events[-1][1]["text"] == expected
    assert events[-1][1]["output_tokens"] > 0 and events[-1][1]["gen"] is None
    # A second turn: the page sends the first turn back as history.
    second = greedy(served, "And the colours?", history=[(QUESTION, expected.strip())])
    _, events = post_chat(web, chat_body("And the colours?", history=[[QUESTION, expected.strip()]]))
    assert events[-1] == ("done", events[-1][1]) and events[-1][1]["text"] == second


def test_ocr_and_gen_toggles(served, web):
    _, events = post_chat(web, chat_body("Read it.", png(text_image()), ocr=True, gen=True))
    question = events[0][1]
    assert all(w in question["ocr"].upper() for w in OCR_WORDS)
    assert question["question"] == f"Read it.\nReference OCR Token: {question['ocr']}\n <GEN>"
    done = events[-1][1]
    assert events[-1][0] == "done" and done["text"] == greedy(served, question["question"], png(text_image()))
    assert done["gen"]["image"] is None and done["gen"]["note"]  # no <h> span / no SDXL here: says why


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"{not json", 400, "not valid JSON"),
        (chat_body(question="   "), 400, "type a question first"),
        (chat_body(images=["data:image/png;base64,@@@"]), 400, "not valid base64"),
        (chat_body(image=b"plain text, not an image"), 400, "cannot decode the image"),
        (chat_body(history="nope"), 400, "history"),
        (chat_body(max_tokens="many"), 400, "max_tokens must be a number"),
        (chat_body(max_tokens=0), 400, "max_tokens must be at least 1"),
        (chat_body(max_tokens=5000), 200, "max_seq_len"),  # refused by the Triton server: an error event
        (chat_body(conv_mode="nope"), 200, "unknown conversation mode"),
    ],
)
def test_bad_input_gets_an_error_and_the_server_keeps_serving(served, web, body, status, message):
    got, events = post_chat(web, body)
    assert got == status
    name, data = events[-1]
    assert name in ("http_error", "error") and message in (data.get("error") or data.get("message")), events
    assert json.loads(get(web, "/api/health")[1])["ready"] is True


def test_a_page_that_goes_away_mid_answer_does_not_hurt_the_server(served, web):
    import http.client

    host, port = web.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/api/chat", json.dumps(chat_body(max_tokens=32)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"event: question")
    conn.close()  # leave before the answer is done
    _, events = post_chat(web, chat_body())
    assert events[-1][0] == "done" and events[-1][1]["text"] == greedy(served, QUESTION)


# ---------------------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        pytest.skip(
            f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install -y chromium; "
            "or set MGM_CHROMIUM); the page is tested in a real browser only"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, web):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(web.url)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready:')")
    yield page
    context.close()


def ask(page, question):
    n = page.locator(".msg.assistant").count()
    page.fill("#question", question)
    page.click("#send")
    answer = page.locator(".msg.assistant").nth(n)
    page.wait_for_function("el => el.dataset.state !== 'streaming'", arg=answer.element_handle())
    return answer


def test_page_upload_ask_and_watch_the_answer_stream(page, served, tmp_path):
    (tmp_path / "cat.png").write_bytes(IMAGE)
    page.set_input_files("#image", str(tmp_path / "cat.png"))
    page.wait_for_selector("#preview[src^='data:image/png']")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(MAX_TOKENS))
    answer = ask(page, QUESTION)
    expected = greedy(served, QUESTION)
    assert answer.get_attribute("data-state") == "done", page.inner_text("#error")
    assert int(answer.get_attribute("data-chunks")) > 1  # deltas were appended one by one
    assert answer.locator(".text").inner_text().strip() == expected.strip() != ""
    assert "tokens, first token" in answer.locator(".meta").inner_text()
    # Second turn: the page keeps the history and sends it back.
    second = greedy(served, "And the colours?", history=[(QUESTION, expected.strip())])
    answer = ask(page, "And the colours?")
    assert answer.locator(".text").inner_text().strip() == second.strip()
    assert page.locator(".msg.user").count() == 2


def test_page_shows_errors_and_keeps_working(page, served, tmp_path):
    page.click("#send")  # nothing typed
    assert "type a question first" in page.inner_text("#error")
    (tmp_path / "bad.png").write_bytes(b"plain text, not an image")
    page.set_input_files("#image", str(tmp_path / "bad.png"))
    page.wait_for_selector("#preview[src^='data:']", state="attached")
    answer = ask(page, QUESTION)
    assert answer.get_attribute("data-state") == "error"
    assert "cannot decode the image" in page.inner_text("#error")
    (tmp_path / "ok.png").write_bytes(IMAGE)  # a good image: it works again
    page.set_input_files("#image", str(tmp_path / "ok.png"))
    page.wait_for_selector("#preview[src^='data:image/png']")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(MAX_TOKENS))
    answer = ask(page, QUESTION)
    assert answer.get_attribute("data-state") == "done" and page.inner_text("#error") == ""
    assert answer.locator(".text").inner_text().strip() == greedy(served, QUESTION).strip()
