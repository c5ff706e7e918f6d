"""TensorRT-LLM's prompt-table convention: fake token ids select rows of a per-request table.

An id < vocab_size looks up the vocabulary; an id >= vocab_size takes row (id - vocab_size) of the
prompt table (the image features, flattened to (rows, hidden)). This is what the engine's
`PromptTuningEmbedding` does, what the CPU engine does before prefill and what the checkpoint check
and the benchmarks feed HF models. Gemma's sqrt(hidden) scale is applied afterwards by the model, to
both kinds of rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fake_ids(vocab_size: int, rows: int, start: int = 0) -> list[int]:
    """The ids that address prompt-table rows start .. start + rows - 1."""
    return list(range(vocab_size + start, vocab_size + start + rows))


def embed_with_prompt_table(
    input_ids: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    prompt_table: torch.Tensor | None,
    vocab_size: int,
) -> torch.Tensor:
    """(..., H) embeddings of `input_ids` (...,): vocabulary rows from `embed`, fake ids from `prompt_table`.

    The result has `embed`'s dtype and device. ValueError when a fake id has no table or no row, or when
    a row the prompt uses is not finite (a NaN row would silently poison the whole answer).
    """
    fake = input_ids >= vocab_size
    embeds = embed(torch.where(fake, torch.zeros_like(input_ids), input_ids))
    if not bool(fake.any()):
        return embeds
    if prompt_table is None:
        raise ValueError(f"input_ids contain fake ids (>= vocab_size {vocab_size}) but no prompt_table was given")
    rows = (input_ids[fake] - vocab_size).to(prompt_table.device)
    if int(rows.max()) >= prompt_table.shape[0]:
        raise ValueError(
            f"fake id {int(rows.max()) + vocab_size} selects prompt_table row {int(rows.max())}, "
            f"but the table has {prompt_table.shape[0]} rows"
        )
    picked = prompt_table[rows].to(embeds.device, embeds.dtype)
    if not bool(torch.isfinite(picked).all()):
        raise ValueError("prompt_table has non-finite values (NaN/inf) in the rows the prompt uses")
    embeds[fake] = picked
    return embeds
