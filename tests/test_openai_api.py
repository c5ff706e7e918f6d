"""The OpenAI-compatible API on a real tritonserver (CPU, tiny checkpoints), checked against mgm_ref.

The official `openai` client must get exactly mgm_ref's greedy answer for the same conversation;
raw SSE is read with httpx; every bad input gets its status and OpenAI error object while the
server keeps answering. One start of the OpenAI server rides on the shared tiny-llama Triton; the
several-variants test starts its own repository under `mgm-serve --openai_port`.

Over 400 lines: the tests share one served model and one OpenAI server start (30 s each on 2 cores).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mgm_ref.conversation import get_template, image_placeholders
from mgm_ref.model import GenerationParams
from mgm_ref.preprocess import load_image
from tests.helpers.images import png, random_image
from tests.helpers.served import served_text
from triton_models.launcher.argv import ADMIN_KEY_ENV
from triton_models.server import free_port

pytestmark = pytest.mark.server
openai = pytest.importorskip("openai")

MAX_TOKENS = 10
IMAGE = png(random_image(480, 320, seed=11))
QUESTION = "What is in the picture?"
TRANSCRIPTS: list[str] = []  # request -> answer, printed with -s for the closing note


def data_url(blob: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(blob).decode()}"


def image_part(blob: bytes = IMAGE) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(blob)}}


def reference(ref, question, images=(), history=None, system=None, max_tokens=MAX_TOKENS):
    """mgm_ref's greedy (text, completion tokens, prompt tokens incl. image tokens), built like the original CLI."""
    conv = get_template(ref.conv_mode)
    if system is not None:
        conv.system = system
    for k, (user, answer) in enumerate(list(history or []) + [(question, None)]):
        conv.append(conv.roles[0], image_placeholders(user, len(images)) if k == 0 else user)
        conv.append(conv.roles[1], answer)
    ids = ref.tokenize(conv.get_prompt())
    pils = [load_image(b) for b in images]
    out = ref.generate(
        [ids], ref.image_features(pils) if pils else None, GenerationParams(max_new_tokens=max_tokens, temperature=0)
    )[0]
    prompt_tokens = len(ids) + len(images) * (ref.config.tokens_per_image - 1)
    return served_text(ref, out), len(out), prompt_tokens


class OpenAIServer:
    """`python -m client.openai_api` (what mgm-openai runs) as a child process on a free port."""

    def __init__(self, triton_url: str, *extra: str, log: Path, admin_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client.openai_api", "--triton_url", triton_url, "--port", str(self.port), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, ADMIN_KEY_ENV: admin_key} if admin_key else None,
        )
        wait_http(f"{self.url}/health", self.proc)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self._log.close()


def wait_http(url: str, proc, timeout: float = 60, want=lambda r: True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            r = httpx.get(url, timeout=2)
            if want(r):
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer as wanted within {timeout} s")


@pytest.fixture(scope="module")
def llama(served_llama):
    return served_llama


@pytest.fixture(scope="module")
def api(llama, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "cat.png").write_bytes(IMAGE)
    server = OpenAIServer(
        llama.server.grpc_url,
        "--allowed_local_media_path",
        str(media),
        "--max_image_mb",
        "1",
        "--max_body_mb",
        "3",
        log=tmp_path_factory.mktemp("openai") / "server.log",
        admin_key=llama.server.admin_key,
    )
    server.media = media
    yield server
    server.stop()


def record(request: str, answer: str) -> None:
    TRANSCRIPTS.append(f"{request}\n  -> {answer!r}")
    print(TRANSCRIPTS[-1])


def test_models_health_and_metrics(api):
    assert [m.id for m in api.client().models.list()] == ["mgm"]
    assert httpx.get(f"{api.url}/health").json() == {"status": "ok", "models": {"mgm": "ready"}}
    api.client().chat.completions.create(model="mgm", messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
    text = httpx.get(f"{api.url}/metrics").text
    for name in (
        "mgm_openai_requests_total",
        "mgm_openai_completion_tokens_total",
        "mgm_openai_prompt_tokens_total",
        "mgm_openai_time_to_first_token_seconds_bucket",
        "mgm_openai_request_latency_seconds_bucket",
        "mgm_openai_errors_total",
    ):
        assert name in text
    assert 'mgm_openai_requests_total{model="mgm",status="200"}' in text


def test_text_only_non_streaming(api, llama):
    text, n, n_prompt = reference(llama.ref, "Say something.")
    r = api.client().chat.completions.create(
        model="mgm", messages=[{"role": "user", "content": "Say something."}], max_tokens=MAX_TOKENS, temperature=0
    )
    record("user 'Say something.' (max_tokens=10, temperature=0)", r.choices[0].message.content)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert (r.usage.completion_tokens, r.usage.prompt_tokens) == (n, n_prompt)
    assert r.usage.total_tokens == n + n_prompt
    assert r.choices[0].finish_reason == ("length" if n == MAX_TOKENS else "stop")
    assert r.id.startswith("chatcmpl-") and r.model == "mgm" and r.created > 0 and r.object == "chat.completion"


def test_image_data_url_streaming_and_not(api, llama):
    text, n, n_prompt = reference(llama.ref, QUESTION, [IMAGE])
    messages = [{"role": "user", "content": [image_part(), {"type": "text", "text": QUESTION}]}]
    r = api.client().chat.completions.create(
        model="mgm", messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    record(f"user [image 480x320 PNG data URL, {QUESTION!r}]", r.choices[0].message.content)
    assert r.choices[0].message.content == text and r.usage.prompt_tokens == n_prompt
    assert n_prompt > llama.ref.config.tokens_per_image  # the image tokens are counted
    chunks = list(
        api.client().chat.completions.create(
            model="mgm",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    record(f"stream: user [image, {QUESTION!r}]", streamed)
    assert streamed.strip() == text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == n_prompt


def test_multi_turn_with_an_image_in_the_first_turn(api, llama):
    image = png(random_image(200, 150, seed=5))
    history = [(QUESTION, "A cat on a mat.")]
    text, n, n_prompt = reference(llama.ref, "And the colours?", [image], history)
    assert text != reference(llama.ref, "And the colours?", [image])[0]  # else this test could not see the history
    messages = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, image_part(image)]},
        {"role": "assistant", "content": "A cat on a mat."},
        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
    ]
    r = api.client().chat.completions.create(model="mgm", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    record(
        "user [text, image 200x150] + assistant 'A cat on a mat.' + user 'And the colours?'",
        r.choices[0].message.content,
    )
    assert r.choices[0].message.content == text and (r.usage.completion_tokens, r.usage.prompt_tokens) == (n, n_prompt)


def test_system_message_replaces_the_template_system_prompt(api, llama):
    history, system = [("Hello there.", "Hi.")], "Answer in French."
    text, n, _ = reference(llama.ref, "And the colours?", [], history, system)
    assert text != reference(llama.ref, "And the colours?", [], history)[0]
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "And the colours?"},
    ]
    r = api.client().chat.completions.create(model="mgm", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    record(
        f"system {system!r} + user 'Hello there.' + assistant 'Hi.' + user 'And the colours?'",
        r.choices[0].message.content,
    )
    assert r.choices[0].message.content == text and r.usage.completion_tokens == n


def test_file_url_under_the_allowed_path_and_stop_sequences(api, llama):
    text, _, _ = reference(llama.ref, QUESTION, [IMAGE], max_tokens=24)
    words = text.split()
    stop = next(w for w in words[1:] if len(w) >= 2)[:2]
    expected = text[: text.index(stop)].strip()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"file://{api.media}/cat.png"}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    for stream in (False, True):
        r = api.client().chat.completions.create(
            model="mgm", messages=messages, max_tokens=24, temperature=0, stop=[stop, "never-seen"], stream=stream
        )
        got = "".join(c.choices[0].delta.content or "" for c in r).strip() if stream else r.choices[0].message.content
        record(f"user [file:// image, {QUESTION!r}] stop={stop!r} stream={stream}", got)
        assert got == expected


def test_raw_sse_format(api):
    body = {
        "model": "mgm",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 4,
        "stream": True,
    }
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {p["id"] for p in payloads} == {payloads[0]["id"]} and "usage" not in payloads[0]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def bad_requests(media: Path):
    good = {"model": "mgm", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}

    def with_(**kw):
        return json.dumps({**good, **kw})

    def user(*parts):
        return with_(messages=[{"role": "user", "content": list(parts)}])

    def url_part(url):
        return {"type": "image_url", "image_url": {"url": url}}

    text = {"type": "text", "text": QUESTION}
    big = png(random_image(700, 700, seed=3))  # 1.4 MiB: over the 1 MiB --max_image_mb, under --max_body_mb
    small = png(random_image(40, 30, seed=4))
    return [
        ("body is not JSON", "{not json", 400),
        ("messages missing", json.dumps({"model": "mgm"}), 400),
        ("messages empty", with_(messages=[]), 400),
        ("unknown role", with_(messages=[{"role": "tool", "content": "x"}]), 400),
        ("unknown model", with_(model="gpt-4o"), 404),
        ("n=2", with_(n=2), 400),
        ("max_tokens=0", with_(max_tokens=0), 400),
        ("max_completion_tokens=-3", with_(max_completion_tokens=-3), 400),
        ("temperature=-1", with_(temperature=-1), 400),
        ("top_p=2", with_(top_p=2), 400),
        ("top_k=-1", with_(top_k=-1), 400),
        ("seed=-1", with_(seed=-1), 400),
        ("5 stop sequences", with_(stop=["a", "b", "c", "d", "e"]), 400),
        ("logprobs=true", with_(logprobs=True), 400),
        (
            "last message from the assistant",
            with_(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
            400,
        ),
        (
            "two user messages in a row",
            with_(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            400,
        ),
        (
            "image in a later user turn",
            with_(
                messages=[
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": [url_part(data_url(IMAGE))]},
                ]
            ),
            400,
        ),
        ("http image URL (no server-side fetching)", user(url_part("http://169.254.169.254/latest/x.png"), text), 400),
        ("https image URL", user(url_part("https://example.com/cat.png"), text), 400),
        ("file:// outside the allowed path", user(url_part("file:///etc/passwd"), text), 400),
        ("file:// escaping the allowed path with ..", user(url_part(f"file://{media}/../../etc/passwd"), text), 400),
        ("data URL of a GIF", user(url_part("data:image/gif;base64,R0lGODlhAQABAAAAACw="), text), 400),
        ("data URL with bad base64", user(url_part("data:image/png;base64,%%%"), text), 400),
        ("data URL that is not an image", user(url_part(data_url(b"just some text")), text), 400),
        ("PNG header, corrupt body", user(url_part(data_url(IMAGE[:64])), text), 400),
        ("9 images (server limit 8)", user(*[url_part(data_url(small))] * 9, text), 400),
        ("5 images (model limit 4)", user(*[url_part(data_url(small))] * 5, text), 400),
        (
            "two <image> tags, one image",
            user(url_part(data_url(IMAGE)), {"type": "text", "text": "<image> <image>"}),
            400,
        ),
        ("empty prompt", with_(messages=[{"role": "user", "content": "   "}]), 400),
        ("prompt over max_input_len", with_(messages=[{"role": "user", "content": "word " * 3000}]), 400),
        ("max_tokens over max_seq_len", with_(max_tokens=10**6), 400),
        ("image over --max_image_mb", user(url_part(data_url(big)), text), 413),
        ("body over --max_body_mb", with_(padding="x" * (3 * 1024 * 1024 + 10)), 413),
        ("bad input with stream=true", json.dumps({**good, "stream": True, "temperature": -1}), 400),
        (
            "bad image with stream=true",
            json.dumps({**json.loads(user(url_part(data_url(IMAGE[:64])), text)), "stream": True}),
            400,
        ),
    ]


def test_bad_inputs_get_their_status_and_error_object(api):
    results = []
    for name, body, status in bad_requests(api.media):
        r = httpx.post(
            f"{api.url}/v1/chat/completions", content=body, timeout=60, headers={"Content-Type": "application/json"}
        )
        error = r.json()["error"]
        results.append(f"{name}: {r.status_code} {error['message'][:110]!r}")
        assert r.status_code == status, results[-1]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], results[-1]
    r = httpx.get(f"{api.url}/v1/no_such_route")
    assert r.status_code == 404 and "message" in r.json()["error"]
    print("\n".join(results))
    # The official client maps the statuses to its exceptions; the server still answers afterwards.
    with pytest.raises(openai.NotFoundError):
        api.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi."}])
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        api.client().chat.completions.create(model="mgm", messages=[{"role": "user", "content": "Hi."}], n=2)
    r = api.client().chat.completions.create(model="mgm", messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
    assert r.usage.completion_tokens > 0
    assert 'mgm_openai_errors_total{code="model_not_found",status="404"}' in httpx.get(f"{api.url}/metrics").text


def test_client_disconnect_is_cancelled_and_counted(api):
    body = {
        "model": "mgm",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the role chunk, then walk away
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up while the answer is made
        httpx.post(f"{api.url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)

    def counted(r):
        return 'mgm_openai_requests_total{model="mgm",status="499"} 2.0' in r.text

    wait_http(f"{api.url}/metrics", api.proc, timeout=30, want=counted)
    r = api.client().chat.completions.create(model="mgm", messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
    assert r.usage.completion_tokens > 0


def test_not_ready_triton_is_503(tmp_path):
    dead = OpenAIServer(f"127.0.0.1:{free_port()}", log=tmp_path / "dead.log")
    try:
        assert httpx.get(f"{dead.url}/health").status_code == 503
        r = httpx.post(
            f"{dead.url}/v1/chat/completions",
            timeout=30,
            json={"model": "mgm", "messages": [{"role": "user", "content": "Hi."}]},
        )
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert dead.client().models.list().data == []
    finally:
        dead.stop()


def test_print_transcripts():
    print("\n\nopenai-client transcripts:\n" + "\n".join(TRANSCRIPTS))


def build_variant(ckpt, work: Path, repo: Path, name: str, cli: bool = False):
    """Vision engine + `mgm-build repo --name` into a shared repository; the checkpoint's mgm_ref model."""
    from build_engines.vision import build_vision
    from mgm_ref.loader import load_model
    from triton_models.repo_builder import build_repo

    ref = load_model(ckpt)
    engines = work / name
    build_vision(
        ref.vision,
        ref.config,
        engines / "vision",
        dtype="float32",
        backend="onnxruntime",
        max_batch_size=4,
        verify=False,
        log=lambda m: None,
    )
    if cli:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "build_engines.cli",
                "repo",
                "--model_dir",
                str(ckpt),
                "--engine_dir",
                str(engines),
                "--output_dir",
                str(repo),
                "--backend",
                "cpu",
                "--name",
                name,
            ],
            check=True,
        )
    else:
        build_repo(ckpt, engines, repo, backend="cpu", max_batch_size=8, name=name)
    return ref


def test_several_variants_behind_one_endpoint_under_mgm_serve(tiny_checkpoints, tmp_path):
    repo = tmp_path / "repo"
    refs = {
        "llama-a": build_variant(tiny_checkpoints("llama"), tmp_path, repo, "llama-a", cli=True),
        "gemma-b": build_variant(tiny_checkpoints("gemma"), tmp_path, repo, "gemma-b"),
    }
    build_variant(tiny_checkpoints("llama"), tmp_path, repo, "broken")
    config = repo / "broken_vision_encoder" / "config.pbtxt"  # this variant's vision engine is missing
    config.write_text(config.read_text().replace(str(tmp_path / "broken" / "vision"), str(tmp_path / "nowhere")))
    ports = [free_port() for _ in range(4)]
    log = open(tmp_path / "mgm-serve.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "triton_models.server",
            "--model_repo",
            str(repo),
            "--http_port",
            str(ports[0]),
            "--grpc_port",
            str(ports[1]),
            "--metrics_port",
            str(ports[2]),
            "--openai_port",
            str(ports[3]),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{ports[3]}"
    try:
        r = wait_http(
            f"{url}/health",
            proc,
            timeout=600,
            want=lambda r: (
                "llama-a" in r.text
                and "gemma-b" in r.text
                and "loading" not in r.text
                and r.json()["models"].get("gemma-b") == "ready"
                and r.json()["models"].get("llama-a") == "ready"
            ),
        )
        health = r.json()
        assert r.status_code == 503 and health["status"] == "unavailable"  # one variant is broken
        assert "broken_vision_encoder is unavailable" in health["models"]["broken"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list()) == ["gemma-b", "llama-a"]
        messages = [{"role": "user", "content": [image_part(), {"type": "text", "text": QUESTION}]}]
        answers = {}
        for name, ref in refs.items():
            text, n, n_prompt = reference(ref, QUESTION, [IMAGE])
            r = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
            record(f"model={name}: user [image, {QUESTION!r}]", r.choices[0].message.content)
            assert (r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens) == (
                text,
                n,
                n_prompt,
            )
            assert r.model == name
            answers[name] = text
        assert answers["llama-a"] != answers["gemma-b"]  # the routing is visible
        with pytest.raises(openai.InternalServerError) as e:  # 503: that variant did not load
            client.chat.completions.create(model="broken", messages=messages, max_tokens=2)
        assert e.value.status_code == 503
        with pytest.raises(openai.BadRequestError, match="no system prompt"):  # gemma's template has none
            client.chat.completions.create(
                model="gemma-b",
                max_tokens=2,
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
            )
        from client.mgm_client import MGMClient  # a variant's BLS streams from the Triton client too

        streamed = MGMClient(f"127.0.0.1:{ports[1]}", model="llama-a_mgm_bls").stream_answer(
            QUESTION, [IMAGE], max_tokens=MAX_TOKENS, temperature=0.0
        )
        assert streamed.text.strip() == answers["llama-a"] and len(streamed.chunks) > 1
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "client.cli",
                "--url",
                f"127.0.0.1:{ports[1]}",
                "--model_name",
                "gemma-b",
                "--prompt",
                "Say something.",
                "--max_tokens",
                str(MAX_TOKENS),
                "--temperature",
                "0",
                "--stream",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.strip() == reference(refs["gemma-b"], "Say something.")[0]
    finally:
        proc.terminate()  # mgm-serve stops tritonserver, then the OpenAI server beside it
        assert proc.wait(timeout=60) is not None
        log.close()
    from triton_models.server import port_is_free

    assert all(port_is_free(p) for p in ports), (tmp_path / "mgm-serve.log").read_text()[-3000:]


def test_bench_openai_mode_measures_both_paths(api, llama):
    import asyncio

    from client.openai_api.bench import run, table

    results = asyncio.run(
        run(
            llama.server.grpc_url,
            api.url,
            "mgm",
            [1, 2],
            requests=2,
            max_tokens=4,
            warmup=1,
            admin_key=llama.server.admin_key,
        )
    )
    for c in (1, 2):
        for path in ("grpc", "openai"):
            s = results[c][path]
            assert s["requests"] == 2 and s["ttft_p50_ms"] > 0 and s["output_tok_s"] > 0 and s["tokens_mean"] == 4
    assert "| 2 | openai |" in table(results, (0.0, 0.0, 0.0))
