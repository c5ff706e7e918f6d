"""Request -> model inputs, without Triton: the logic of the `preprocessing` model.

Images are checked from their headers only (format, size, the pixel limit of the padded square) and
passed on still encoded: vision_encoder decodes them, and only on a feature-cache miss. The chat
template is applied and tokenised; each `<image>` (-200) becomes a run of fake ids `vocab_size + k`
that select rows of the prompt embedding table (TensorRT-LLM's multimodal convention), and those
rows get image k's `extra_id` in `extra_ids` (0 for text) so the LLM can key its prefix cache on the
image, not on the fake ids; stop words come in TensorRT-LLM's `stop_words_list` layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgm_ref.config import MGMConfig
from mgm_ref.constants import IMAGE_TOKEN_INDEX, MAX_IMAGE_PIXELS, MAX_IMAGES_PER_REQUEST, text_bytes_limit
from mgm_ref.conversation import build_prompt, stop_token_ids
from mgm_ref.errors import ImageError, PromptError
from mgm_ref.loader import load_tokenizer
from mgm_ref.preprocess import inspect_image
from mgm_ref.tokenization import tokenizer_image_token
from triton_models.lib.chat import ChatTemplates
from triton_models.lib.image_key import PixelConfig, image_key, prompt_table_extra_ids


@dataclass
class ModelInputs:
    input_ids: np.ndarray  # (L,) int32, fake ids >= vocab_size for image rows
    image_bytes: np.ndarray  # (B,) uint8: the N encoded images back to back, as received
    image_sizes: np.ndarray  # (N,) int32: each image's byte count
    extra_ids: np.ndarray  # (L,) uint64: 0 for text, image k's extra_id on each of its rows
    end_id: int
    stop_words: np.ndarray  # (2, K) int32: flattened ids, then end offsets padded with -1


def split_images(blob: np.ndarray | None, sizes: np.ndarray | None) -> list[bytes]:
    """One UINT8 tensor holds the encoded images back to back; `sizes` gives each one's byte count."""
    if blob is None or blob.size == 0:
        return []
    data = np.ascontiguousarray(blob, dtype=np.uint8).tobytes()
    if sizes is None or len(sizes) == 0:
        return [data]
    lengths = [int(s) for s in np.asarray(sizes).reshape(-1)]
    if any(n <= 0 for n in lengths) or sum(lengths) != len(data):
        raise ImageError(f"image_sizes {lengths} do not add up to the {len(data)} bytes of image_input")
    offsets = np.cumsum([0] + lengths)
    return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def parse_history(text: str | None, max_bytes: int | None = None) -> list[tuple[str, str]]:
    """`max_bytes`: refuse longer JSON before parsing it (a JSON string is never shorter than its text,
    and at most 6 times longer: \\u00XX for one byte)."""
    if not text:
        return []
    if max_bytes is not None and len(text) > max_bytes:
        raise PromptError(f"history is {len(text)} characters of JSON; the limit is {max_bytes}")
    try:
        turns = json.loads(text)
        if not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns):
            raise ValueError
    except ValueError:
        raise PromptError('history must be a JSON list of ["user text", "assistant text"] pairs') from None
    return [tuple(t) for t in turns]


class Preprocessor:
    def __init__(
        self,
        model_dir: str | Path,
        max_input_len: int,
        max_images: int = MAX_IMAGES_PER_REQUEST,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        vocab_offset: int | None = None,
    ):
        self.config = MGMConfig.from_model_dir(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.pixel_config = PixelConfig.from_model_dir(model_dir, self.config)
        self.templates = ChatTemplates(model_dir, self.tokenizer, self.config)
        self.max_input_len = max_input_len
        self.max_images = 1 if self.config.hd else max_images
        self.max_image_pixels = max_image_pixels
        # First fake id: the LLM's vocabulary size, or the padded one a TensorRT-LLM engine records.
        self.vocab_offset = vocab_offset or self.config.vocab_size

    def __call__(
        self,
        query: str,
        images: list[bytes],
        history: list[tuple[str, str]] | None = None,
        conv_mode: str | None = None,
        system: str | None = None,
    ) -> ModelInputs:
        if not query or not query.strip():
            raise PromptError("the prompt is empty")
        check_text_bytes(self.max_input_len, query, history, system)
        if len(images) > self.max_images:
            raise PromptError(f"{len(images)} images given; this model takes at most {self.max_images} per request")
        # headers only, before any tokenising: a refused image costs microseconds
        for k, blob in enumerate(images):
            try:
                inspect_image(blob, self.max_image_pixels)
            except ImageError as e:
                raise ImageError(f"image {k + 1} of {len(images)}: {e}" if len(images) > 1 else str(e)) from None
        conv_mode = self.templates.resolve(conv_mode)
        prompt = build_prompt(conv_mode, query, len(images), history, system)
        ids = tokenizer_image_token(prompt, self.tokenizer)
        n_tags = ids.count(IMAGE_TOKEN_INDEX)
        if n_tags != len(images):
            raise PromptError(f"the prompt has {n_tags} <image> tags but {len(images)} images were given")
        input_ids = self.expand_image_tokens(ids)
        if len(input_ids) > self.max_input_len:
            raise PromptError(
                f"the prompt is {len(input_ids)} tokens including {self.config.tokens_per_image} per image; "
                f"max_input_len is {self.max_input_len}"
            )
        keys = [image_key(blob, self.pixel_config) for blob in images]
        token_ids = np.asarray(input_ids, np.int32)
        extra = prompt_table_extra_ids(token_ids, self.vocab_offset, self.config.tokens_per_image, keys)
        packed = np.frombuffer(b"".join(images), np.uint8)
        sizes = np.array([len(b) for b in images], np.int32)
        end_id, stop_words = self.stop_words(conv_mode)
        return ModelInputs(token_ids, packed, sizes, extra, end_id, stop_words)

    def expand_image_tokens(self, ids: list[int]) -> list[int]:
        """Each -200 -> the next T fake ids; ids count on across images, as the prompt table is flat."""
        out: list[int] = []
        next_row, t = self.vocab_offset, self.config.tokens_per_image
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                out.extend(range(next_row, next_row + t))
                next_row += t
            else:
                out.append(i)
        return out

    def stop_words(self, conv_mode: str) -> tuple[int, np.ndarray]:
        end_id, *others = stop_token_ids(self.tokenizer, conv_mode)
        return end_id, stop_words_list([[i] for i in others])


def check_text_bytes(
    max_input_len: int, query: str, history: list[tuple[str, str]] | None = None, system: str | None = None
) -> None:
    """Refuse text that cannot fit `max_input_len` tokens by its byte count alone: before tokenising,
    which for megabytes of text costs seconds and gigabytes (the token count is checked after)."""
    texts = [query, system or ""] + [t for turn in history or () for t in turn]
    size, limit = sum(len(t.encode("utf-8", errors="replace")) for t in texts), text_bytes_limit(max_input_len)
    if size > limit:
        raise PromptError(
            f"the text (query, history and system prompt) is {size} bytes; at most {limit} bytes can fit "
            f"max_input_len {max_input_len} tokens"
        )


def stop_words_list(words: list[list[int]]) -> np.ndarray:
    """TensorRT-LLM layout: row 0 the ids of all words back to back, row 1 their end offsets, -1 padded."""
    flat = [i for w in words for i in w]
    offsets = np.cumsum([len(w) for w in words]).tolist()
    width = max(len(flat), 1)
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    if not flat:
        out[0, 0] = 0  # TensorRT-LLM expects a non-empty row; offset -1 marks "no words"
    return out


def single_token_stops(stop_words: np.ndarray | None) -> list[int]:
    """The single-token stop words of a stop_words_list (what the CPU engine stops on)."""
    if stop_words is None or stop_words.size == 0:
        return []
    ids, offsets = stop_words.reshape(2, -1)
    stops, start = [], 0
    for end in offsets:
        if end < 0:
            break
        if end - start == 1:
            stops.append(int(ids[start]))
        start = end
    return stops
