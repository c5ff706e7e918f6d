"""Prompt text -> token ids with `<image>` as -200, exactly as the original `tokenizer_image_token`."""

from __future__ import annotations

from mgm_ref.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Tokenise each chunk between `<image>` tags (special tokens on), keep BOS once at the start."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(image_token_index)
        ids.extend(chunk[offset:])  # later chunks start with their own BOS: drop it
    return ids
