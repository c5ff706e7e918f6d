"""mgm-client: question building (OCR hint, <GEN>), <h> extraction, and every flag against a real server."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from client import cli, generation
from client.generation import extract_image_prompt, generate_from_answer
from client.ocr import add_ocr_reference, ocr_tokens
from mgm_ref.conversation import TEMPLATES, build_prompt
from tests.helpers.images import OCR_WORDS, png, random_image, text_image

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 8
QUESTION = "What is in the picture?"


# ---------------------------------------------------------------------------------------- the question


def test_build_question_is_the_original_cli_text():
    assert (
        cli.build_question("Read it.", "HELLO, WORLD", gen=True)
        == "Read it.\nReference OCR Token: HELLO, WORLD\n <GEN>"
    )
    assert cli.build_question("Read it.", "", gen=False) == "Read it."  # no tokens: nothing added
    assert cli.build_question("Draw a cat.", gen=True) == "Draw a cat. <GEN>"


def original_add_content(prompt: str, new_content: str) -> str:
    """The original worker's insertion into a templated prompt (mgm/serve/model_worker.py)."""
    if "[INST]" in prompt:
        split_index = prompt.rfind(" [/INST]")
    elif "<|im_end|>" in prompt:
        split_index = prompt.rfind("<|im_end|>")
    else:
        split_index = prompt.rfind("###Assistant:")
    return prompt[:split_index] + new_content + prompt[split_index:]


@pytest.mark.parametrize("conv_mode", sorted(TEMPLATES))
@pytest.mark.parametrize("n_images,history", [(1, None), (0, None), (2, None), (1, [("First?", "An answer.")])])
def test_ocr_hint_and_gen_sit_inside_the_user_turn_for_every_template(conv_mode, n_images, history):
    sent = cli.build_question(QUESTION, "HELLO, WORLD", gen=True)
    plain = build_prompt(conv_mode, QUESTION, n_images, history)
    prompt = build_prompt(conv_mode, sent, n_images, history)
    # Exactly the plain prompt with the question swapped for question + hint: the user turn's text slot,
    # followed, unchanged, by the end of the user turn and the assistant header.
    start = plain.index(QUESTION)
    tail = plain[start + len(QUESTION) :]
    assert plain.count(QUESTION) == 1 and prompt == plain[:start] + sent + tail
    hint = prompt.index("\nReference OCR Token: HELLO, WORLD\n <GEN>")
    assert hint == start + len(QUESTION) and prompt.endswith(sent + tail)
    assert hint > prompt.rfind("<image>")


def test_the_original_worker_misplaced_the_hint_for_vicuna():
    """Why the hint goes into the question: add_content lands inside Vicuna's assistant header."""
    bad = original_add_content(build_prompt("vicuna_v1", QUESTION), " <GEN>")
    assert bad.endswith("ASSISTANT <GEN>:")
    good = build_prompt("vicuna_v1", cli.build_question(QUESTION, gen=True))
    assert good.endswith(f"{QUESTION} <GEN> ASSISTANT:")


def test_ocr_finds_the_rendered_words_and_they_reach_the_question():
    tokens = ocr_tokens([png(text_image())])
    found = [t.strip().upper() for t in tokens.split(",")]
    assert all(word in found for word in OCR_WORDS), tokens
    assert cli.build_question("Read it.", tokens) == f"Read it.\nReference OCR Token: {tokens}\n"
    assert ocr_tokens([png(Image.new("RGB", (200, 100), "white"))]) == ""  # a blank image: no hint
    assert add_ocr_reference("Q", "") == "Q"


# ---------------------------------------------------------------------------------------- <h> spans


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("A cat on a mat. <h>a photo of a cat on a mat, 4k</h>", "a photo of a cat on a mat, 4k"),
        ("<h>first</h> then <h> second </h> and text", "second"),  # the last span, stripped
        ("<h>first</h> then <h>unclosed", "first"),  # the last *complete* span
        ("<h>a <h>nested</h>", "nested"),
        ("no tags at all", None),
        ("only a closing </h> tag", None),
        ("<h>   </h>", None),
        ("<h>opened but never closed", None),
        ("", None),
    ],
)
def test_extract_image_prompt(answer, expected):
    assert extract_image_prompt(answer) == expected
    if expected is not None:  # the original's expression agrees whenever there is a span
        assert answer.split("</h>")[-2].split("<h>")[-1].strip() == expected


def test_generation_without_a_span_or_without_diffusers_says_why(monkeypatch, tmp_path):
    result = generate_from_answer("just words", sd_model=None)
    assert result.prompt is None and result.image_path is None and "no <h>" in result.note
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    result = generate_from_answer("<h>a red car</h>", sd_model=tmp_path)
    assert result.prompt == "a red car" and result.image_path is None and "diffusers is not installed" in result.note


def test_generation_renders_from_a_local_folder_only(monkeypatch, tmp_path):
    calls = {}

    class FakePipeline:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.update(path=path, **kwargs)
            return cls()

        def to(self, device):
            return self

        def __call__(self, prompt, negative_prompt):
            calls.update(prompt=prompt, negative_prompt=negative_prompt)
            return types.SimpleNamespace(images=[Image.new("RGB", (8, 8), (255, 0, 0))])

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(StableDiffusionXLPipeline=FakePipeline))
    monkeypatch.setattr(generation, "_pipelines", {})
    sd = tmp_path / "sdxl"
    assert "no --sd_model" in generate_from_answer("<h>x</h>", None).note
    assert "not a local diffusers folder" in generate_from_answer("<h>x</h>", sd).note
    sd.mkdir()
    (sd / "model_index.json").write_text("{}")
    result = generate_from_answer("A car. <h>a red car</h>", sd, tmp_path / "out" / "car.png")
    assert result.image_path == tmp_path / "out" / "car.png" and result.image_path.is_file()
    assert calls["path"] == str(sd) and calls["local_files_only"] is True
    assert calls["prompt"] == "a red car" and calls["negative_prompt"].startswith("out of frame, lowres")


# ---------------------------------------------------------------------------------------- CLI, no server


class FakeClient:
    """Stands in for MGMClient: records requests, answers with canned text."""

    requests: ClassVar[list] = []
    answers: ClassVar[list] = []

    def __init__(self, url, protocol, model, timeout_s):
        self.url, self.protocol, self.model = url, protocol, model

    def wait_ready(self, timeout_s):
        pass

    def generate(self, prompt, images, **kwargs):
        from client.mgm_client import Answer

        FakeClient.requests.append((prompt, len(images), kwargs))
        return Answer(text=FakeClient.answers.pop(0))

    def stream_answer(self, prompt, images, on_delta, **kwargs):
        answer = self.generate(prompt, images, **kwargs)
        for word in answer.text.split(" "):
            on_delta(word + " ")
        return answer


def run_cli(argv, monkeypatch, capsys, answers, stdin=None):
    FakeClient.requests, FakeClient.answers = [], list(answers)
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO(stdin))
    args = cli.add_client_arguments(__import__("argparse").ArgumentParser()).parse_args(argv)
    rc = cli.run(args, client_factory=FakeClient)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_gen_prints_the_extracted_prompt_and_what_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    rc, out, err = run_cli(
        ["--prompt", "Draw a red car.", "--gen"], monkeypatch, capsys, ["Here you go. <h>a shiny red car</h>"]
    )
    assert rc == 0 and FakeClient.requests[0][0] == "Draw a red car. <GEN>"
    assert "Image prompt: a shiny red car" in out and "diffusers is not installed" in err


def test_cli_chat_sends_history_and_stops_on_an_empty_line(monkeypatch, capsys):
    rc, out, _ = run_cli(["--stream"], monkeypatch, capsys, ["one ", "two"], stdin="first?\nsecond?\n\n")
    assert rc == 0 and out.count("ASSISTANT: ") == 2
    (q1, _, kw1), (q2, _, kw2) = FakeClient.requests
    assert (q1, kw1["history"], q2, kw2["history"]) == ("first?", [], "second?", [("first?", "one")])


def test_cli_model_not_ready_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr("client.mgm_client.MGMClient._model_ready", lambda self: False)
    assert cli.main(["--prompt", "hi", "--ready_timeout", "0.3"]) == 2
    assert "model 'mgm_bls' is not ready" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def served(served_llama):
    return served_llama


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-images")
    random_image(480, 320, seed=11).save(d / "a.png")
    random_image(200, 300, seed=12).save(d / "b.jpg")
    text_image().save(d / "text.png")
    (d / "not-an-image.png").write_bytes(b"this is text, not pixels")
    return d


def mgm_client(served, *args, stdin=None, protocol="grpc"):
    url = served.server.grpc_url if protocol == "grpc" else served.server.http_url
    cmd = [sys.executable, "-m", "client.cli", "--url", url, "--protocol", protocol, *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=180)


@pytest.mark.server
@pytest.mark.parametrize(
    "protocol,model,stream",
    [
        ("grpc", "mgm_bls", False),
        ("grpc", "mgm_bls", True),
        ("http", "mgm_bls", True),
        ("grpc", "ensemble", False),
        ("http", "ensemble", False),
    ],
)
def test_cli_answers_like_mgm_ref(served, images, protocol, model, stream):
    expected, _ = served.expected(QUESTION, [(images / "a.png").read_bytes()], MAX_TOKENS)
    r = mgm_client(
        served,
        "--model",
        model,
        "--image",
        images / "a.png",
        "--prompt",
        QUESTION,
        "--temperature",
        0,
        "--top_p",
        0.9,
        "--max_tokens",
        MAX_TOKENS,
        "--conv_mode",
        "vicuna_v1",
        *(["--stream"] if stream else []),
        protocol=protocol,
    )
    assert r.returncode == 0, r.stderr
    assert expected.strip() and r.stdout == expected + "\n"


@pytest.mark.server
def test_cli_sampling_flags_and_two_images(served, images):
    two = [(images / "a.png").read_bytes(), (images / "b.jpg").read_bytes()]
    sampling = dict(temperature=0.9, top_p=0.8, top_k=20, seed=7)
    expected = served.client().generate("Compare them.", two, max_tokens=MAX_TOKENS, **sampling).text
    flags = [x for k, v in sampling.items() for x in (f"--{k}", v)]
    r = mgm_client(
        served,
        "--image",
        images / "a.png",
        "--image",
        images / "b.jpg",
        "--prompt",
        "Compare them.",
        "--max_tokens",
        MAX_TOKENS,
        *flags,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


@pytest.mark.server
def test_cli_interactive_chat_keeps_history(served, images):
    image = (images / "a.png").read_bytes()
    first, _ = served.expected("Describe it.", [image], MAX_TOKENS)
    second, _ = served.expected("And the colours?", [image], MAX_TOKENS, history=[("Describe it.", first.strip())])
    r = mgm_client(
        served,
        "--image",
        images / "a.png",
        "--stream",
        "--temperature",
        0,
        "--max_tokens",
        MAX_TOKENS,
        stdin="Describe it.\nAnd the colours?\n\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"USER: ASSISTANT: {first}\nUSER: ASSISTANT: {second}\nUSER: "


@pytest.mark.server
def test_cli_ocr_puts_the_rendered_words_in_the_prompt(served, images):
    r = mgm_client(
        served,
        "--image",
        images / "text.png",
        "--ocr",
        "--prompt",
        "Read it.",
        "--debug",
        "--conv_mode",
        "vicuna_v1",
        "--max_tokens",
        MAX_TOKENS,
        "--temperature",
        0,
    )
    assert r.returncode == 0, r.stderr
    tokens = re.search(r"OCR tokens: (.*)", r.stderr).group(1)
    assert all(w in tokens.upper() for w in OCR_WORDS)
    sent = f"Read it.\nReference OCR Token: {tokens}\n"
    assert f"question: {sent!r}" in r.stderr
    assert repr(f"USER: <image>\n{sent} ASSISTANT:")[1:-1] in r.stderr  # inside the user turn
    expected = (
        served.client()
        .generate(
            sent, [(images / "text.png").read_bytes()], max_tokens=MAX_TOKENS, temperature=0.0, conv_mode="vicuna_v1"
        )
        .text
    )
    assert r.stdout == expected + "\n"


@pytest.mark.server
def test_cli_gen_with_a_tiny_model(served, images, tmp_path):
    r = mgm_client(
        served,
        "--image",
        images / "a.png",
        "--gen",
        "--prompt",
        "Draw it.",
        "--debug",
        "--max_tokens",
        MAX_TOKENS,
        "--sd_model",
        tmp_path / "no-sdxl",
        "--output_file",
        tmp_path / "g.png",
    )
    assert r.returncode == 0, r.stderr
    assert "question: 'Draw it. <GEN>'" in r.stderr
    # The tiny model writes no <h> span (if it ever did, the prompt is printed and the reason given).
    assert "no <h>...</h> image prompt" in r.stderr or "Image prompt:" in r.stdout
    assert not (tmp_path / "g.png").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
@pytest.mark.parametrize(
    "case,args,message",
    [
        ("unreachable", ["--url", "127.0.0.1:{port}", "--ready_timeout", "1"], "cannot reach the server"),
        ("missing image", ["--image", "{dir}/missing.png"], "cannot read image"),
        ("not an image", ["--image", "{dir}/not-an-image.png"], "cannot decode the image"),
        ("max_tokens 0", ["--max_tokens", "0"], "max_tokens must be at least 1"),
        ("server-side error", ["--max_tokens", "5000"], "max_seq_len"),
        ("bad template", ["--conv_mode", "nope"], "unknown conversation mode"),
        ("bad temperature", ["--temperature", "-1"], "temperature"),
        ("ocr without image", ["--ocr"], "--ocr needs"),
    ],
)
def test_cli_errors_exit_2_with_the_message(served, images, case, args, message):
    args = [a.format(port=free_port(), dir=images) for a in args]
    if case not in ("missing image", "not an image", "ocr without image"):
        args += ["--image", str(images / "a.png")]
    r = mgm_client(served, "--prompt", QUESTION, "--max_tokens", MAX_TOKENS, *args)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(err) == 1, (r.stdout, r.stderr)
    assert err[0].startswith("mgm-client: error: ") and message in err[0]
