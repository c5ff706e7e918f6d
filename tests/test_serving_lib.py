"""The Triton-free serving library, without a server: preprocessing, stop words, incremental
detokenising, the BLS answer pipeline, the vision runner's chunking."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mgm_ref.constants import IMAGE_TOKEN_INDEX
from mgm_ref.errors import ImageError, PromptError
from mgm_ref.loader import load_tokenizer
from tests.helpers.images import png, random_image
from triton_models.lib.detokenize import IncrementalDetokenizer
from triton_models.lib.pipeline import AnswerText, Piece, run_answer
from triton_models.lib.preprocess import Preprocessor, parse_history, single_token_stops, split_images, stop_words_list


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return load_tokenizer(llama_dir)


# ---- preprocessing --------------------------------------------------------------------------------
def test_preprocessor_expands_each_image_into_its_own_fake_ids(llama_dir):
    pre = Preprocessor(llama_dir, max_input_len=2048, vocab_offset=1000)
    t = pre.config.tokens_per_image
    images = [png(random_image(64, 48, seed=1)), png(random_image(40, 90, seed=2))]
    out = pre("Compare the pictures.", images)
    ids = out.input_ids.tolist()
    fake = [i for i in ids if i >= 1000]
    assert fake == list(range(1000, 1000 + 2 * t))  # one flat table: the second image continues the first
    first = ids.index(1000)
    assert ids[first : first + t] == list(range(1000, 1000 + t))
    # the images travel encoded, as received; each row carries its image's extra id, text rows 0
    assert out.image_bytes.tobytes() == b"".join(images) and out.image_sizes.tolist() == [len(b) for b in images]
    extra = out.extra_ids[np.asarray(ids) >= 1000]
    assert len(set(extra[:t].tolist())) == 1 and len(set(extra[t:].tolist())) == 1 and extra[0] != extra[t]
    assert (out.extra_ids[np.asarray(ids) < 1000] == 0).all() and (extra != 0).all()
    assert out.end_id == pre.tokenizer.eos_token_id
    text_only = pre("Say something.", [])
    assert text_only.image_sizes.size == 0 and max(text_only.input_ids) < 1000
    assert IMAGE_TOKEN_INDEX not in out.input_ids


@pytest.mark.parametrize(
    "query,images,message",
    [
        ("   ", 0, "the prompt is empty"),
        ("<image> <image> two tags", 1, "2 <image> tags but 1 images"),
        ("too many", 5, "at most 4"),
        ("word " * 3000, 0, "max_input_len"),
    ],
)
def test_preprocessor_refuses_bad_prompts(llama_dir, query, images, message):
    pre = Preprocessor(llama_dir, max_input_len=2048)
    with pytest.raises(PromptError, match=message):
        pre(query, [png(random_image(32, 32, seed=3))] * images)


def test_split_images_and_history_parsing():
    blob = np.frombuffer(b"aaabbbbb", np.uint8)
    assert split_images(blob, np.array([3, 5])) == [b"aaa", b"bbbbb"]
    assert split_images(blob, None) == [b"aaabbbbb"] and split_images(None, None) == []
    with pytest.raises(ImageError, match="do not add up"):
        split_images(blob, np.array([3, 4]))
    assert parse_history('[["hi", "hello"]]') == [("hi", "hello")] and parse_history(None) == []
    with pytest.raises(PromptError, match="JSON list"):
        parse_history('[["only one"]]')


def test_stop_words_layout_round_trips():
    out = stop_words_list([[7], [8, 9], [10]])
    assert out.tolist() == [[7, 8, 9, 10], [1, 3, 4, -1]]
    assert single_token_stops(out) == [7, 10]  # the two-token word is not a single-token stop
    empty = stop_words_list([])
    assert empty.tolist() == [[0], [-1]] and single_token_stops(empty) == []
    assert single_token_stops(None) == []


# ---- incremental detokenising ---------------------------------------------------------------------
def test_detokenizer_never_splits_a_utf8_character(tokenizer):
    text = " café ünïcödé 😀 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([i]) for i in ids] + [detok.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas[:-1])  # a split character was held back at least once


def test_detokenizer_holds_back_a_possible_stop_string_and_cuts_at_it(tokenizer):
    ids = tokenizer.encode(" yes STOP more", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop_strings=("STOP",))
    sent = ""
    for i in ids:
        sent += detok.push([i])
        assert "S" not in sent  # never shown before it is known not to be a stop string
        if detok.stopped:
            break
    assert detok.stopped and (sent + detok.finish()).strip() == "yes"
    # a prefix of the stop string that does not complete it is released
    detok = IncrementalDetokenizer(tokenizer, stop_strings=("STOP",))
    got = "".join(detok.push([i]) for i in tokenizer.encode(" ST and more", add_special_tokens=False))
    assert (got + detok.finish()) == " ST and more" and not detok.stopped


# ---- the BLS pipeline -----------------------------------------------------------------------------
class FakeTokens:
    def __init__(self, chunks):
        self.chunks, self.reads, self.closed = list(chunks), 0, False

    async def next(self):
        self.reads += 1
        return self.chunks.pop(0) if self.chunks else None

    async def close(self):
        self.closed = True


class FakeStages:
    def __init__(self, chunks):
        self.tokens = FakeTokens(chunks)
        self.calls = []

    async def preprocess(self):
        self.calls.append("preprocess")
        return "pre"

    async def encode(self, pre):
        self.calls.append(("encode", pre))
        return "vis"

    async def generate(self, pre, vis):
        self.calls.append(("generate", pre, vis))
        return self.tokens


def answer(tokenizer, text, stream, stops=(), per_chunk=1, cancel_after=None):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stages = FakeStages([ids[i : i + per_chunk] for i in range(0, len(ids), per_chunk)])
    pieces: list[Piece] = []
    cancelled = (lambda: len(pieces) >= cancel_after) if cancel_after is not None else (lambda: False)
    asyncio.run(run_answer(stages, AnswerText(tokenizer, stops, stream), pieces.append, cancelled))
    return stages, pieces


def test_pipeline_streams_pieces_without_leading_space_and_one_final(tokenizer):
    stages, pieces = answer(tokenizer, "   Hello there, friend.", stream=True)
    assert stages.calls == ["preprocess", ("encode", "pre"), ("generate", "pre", "vis")]
    assert [p.final for p in pieces] == [False] * (len(pieces) - 1) + [True] and len(pieces) > 3
    assert "".join(p.text for p in pieces) == "Hello there, friend."
    assert pieces[0].text and not pieces[0].text[0].isspace()
    n = len(tokenizer.encode("   Hello there, friend.", add_special_tokens=False))
    assert pieces[-1].tokens == n and all(p.ttft_ms >= 0 for p in pieces)
    assert stages.tokens.closed


def test_pipeline_whole_answer_is_one_stripped_piece(tokenizer):
    _, pieces = answer(tokenizer, "  An answer.  ", stream=False, per_chunk=2)
    assert [(p.text, p.final) for p in pieces] == [("An answer.", True)]


def test_pipeline_stops_reading_at_a_stop_string(tokenizer):
    stages, pieces = answer(
        tokenizer, " first part<|im_end|> never shown and more tokens after it", stream=True, stops=("<|im_end|>",)
    )
    assert "".join(p.text for p in pieces).strip() == "first part"
    assert stages.tokens.chunks, "the pipeline kept reading after the stop string"
    assert stages.tokens.closed


def test_pipeline_stops_reading_when_the_client_left(tokenizer):
    stages, pieces = answer(tokenizer, " one two three four five six seven eight", stream=True, cancel_after=2)
    assert stages.tokens.chunks and stages.tokens.closed
    assert pieces[-1].final and len(pieces) == 3


# ---- the vision runner ----------------------------------------------------------------------------
def test_vision_runner_runs_in_chunks_of_its_max_batch_size():
    import torch

    from triton_models.lib.vision_runner import VisionRunner

    seen = []

    def runner(images, images_aux):
        seen.append((images.shape[0], images_aux.shape[0]))
        return {"image_features": images.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 4, 8).to(torch.float16)}

    vr = VisionRunner({"max_batch_size": 2, "tokens_per_image": 4, "hidden_size": 8}, runner)
    images = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 3, 2, 2), np.float32)
    out = vr(images, np.zeros((5, 3, 4, 4), np.float32))
    assert seen == [(2, 2), (2, 2), (1, 1)]
    assert out.shape == (5, 4, 8) and out.dtype == np.float32
    assert out[:, 0, 0].tolist() == [0, 1, 2, 3, 4]  # chunks come back in order
    assert vr(images[:0], np.zeros((0, 3, 4, 4), np.float32)).shape == (0, 4, 8) and len(seen) == 3


def test_importing_the_serving_library_leaves_the_locale_alone():
    import os
    import subprocess
    import sys

    code = (
        "import locale; before = locale.setlocale(locale.LC_CTYPE); import triton_models.lib, "
        "triton_models.lib.preprocess, triton_models.lib.engine, triton_models.lib.pipeline, "
        "triton_models.lib.triton_io; after = locale.setlocale(locale.LC_CTYPE); "
        "assert before == after, (before, after)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    subprocess.run([sys.executable, "-X", "utf8=0", "-c", code], check=True, env={**env, "LC_ALL": "C"})
