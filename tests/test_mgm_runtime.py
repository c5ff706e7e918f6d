"""The runtime layer's shared pieces: the prompt-table lookup, rel L2, the greedy threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgm_runtime.numerics import GREEDY_TEMPERATURE, rel_l2
from mgm_runtime.prompt_table import embed_with_prompt_table, fake_ids

VOCAB, HIDDEN = 50, 8


def test_fake_ids_take_their_prompt_table_rows_and_the_rest_the_vocabulary():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    table = torch.randn(6, HIDDEN, dtype=torch.float64)
    ids = torch.tensor([3, *fake_ids(VOCAB, 2, start=4), 7, *fake_ids(VOCAB, 1)])
    with torch.no_grad():
        got = embed_with_prompt_table(ids, embedding, table, VOCAB)
        want = torch.stack(
            [embedding.weight[3], table[4].float(), table[5].float(), embedding.weight[7], table[0].float()]
        )
    assert got.dtype == embedding.weight.dtype and torch.equal(got, want)
    # a weight matrix works as the lookup too (the exported checkpoint's vocab_embedding)
    assert torch.equal(embed_with_prompt_table(ids, embedding.weight.detach().__getitem__, table, VOCAB), want)


@pytest.mark.parametrize(
    "table,match",
    [
        (None, "no prompt_table"),
        (torch.zeros(1, HIDDEN), "has 1 rows"),
        (torch.full((2, HIDDEN), float("nan")), "non-finite"),
    ],
)
def test_prompt_table_errors(table, match):
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        embed_with_prompt_table(torch.tensor([1, VOCAB + 1]), embedding, table, VOCAB)


def test_rel_l2_mixes_numpy_and_torch_and_refuses_shape_mismatch():
    want = np.array([3.0, 4.0])
    assert rel_l2(torch.tensor([3.0, 4.0], dtype=torch.bfloat16), want) == 0
    assert rel_l2(np.array([3.0, 4.5]), want) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shape"):
        rel_l2(np.zeros(3), want)


def test_every_layer_uses_the_same_greedy_threshold():
    from mgm_ref.model import GenerationParams
    from triton_models.lib.sampling import RowSampling

    for t, greedy in ((0.0, True), (GREEDY_TEMPERATURE, True), (GREEDY_TEMPERATURE * 1.01, False)):
        assert GenerationParams(temperature=t).greedy is greedy
        assert RowSampling(temperature=t).greedy is greedy
