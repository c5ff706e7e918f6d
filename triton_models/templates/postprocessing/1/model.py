"""Triton glue: detokenize every request of a batch with one batch_decode, trim each request's own
template's stop strings (its CONV_MODE, else the model's default).

Each request's tensors are checked on their own first, so a bad one (a direct call with ids outside
the vocabulary, a missing or wrong length) fails alone instead of failing the batch's one decode call.
"""

import json

import numpy as np

from mgm_ref.conversation import trim_answer
from mgm_ref.loader import load_tokenizer
from triton_models.lib.chat import ChatTemplates
from triton_models.lib.detokenize import drop_incomplete_tail
from triton_models.lib.triton_io import (
    InputError,
    bytes_tensor,
    check_config,
    error_response,
    params_of,
    pb,
    per_request,
    required_input,
    string_input,
    use_utf8_locale,
)


class TritonPythonModel:
    def initialize(self, args):
        use_utf8_locale()
        config = json.loads(args["model_config"])
        check_config(
            config,
            decoupled=False,
            inputs={"TOKENS_BATCH": "TYPE_INT32", "SEQUENCE_LENGTH": "TYPE_INT32", "CONV_MODE": "TYPE_STRING"},
            outputs={"OUTPUT": "TYPE_STRING"},
        )
        params = params_of(config)
        self.tokenizer = load_tokenizer(params["model_dir"])
        self.templates = ChatTemplates(params["model_dir"], self.tokenizer)

    def execute(self, requests):
        pb_utils = pb()
        responses, kept = per_request(requests, self.token_ids)
        owners, seqs = [k for k, _ in kept], [ids for _, ids in kept]
        try:
            texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True) if seqs else []
        except Exception as e:  # noqa: BLE001 - checked ids should decode; if not, only those requests fail
            texts = [e] * len(seqs)
        for k, text in zip(owners, texts, strict=True):
            try:
                if isinstance(text, Exception):
                    raise text
                conv_mode = self.templates.resolve(string_input(requests[k], "CONV_MODE"))
                answer = trim_answer(drop_incomplete_tail(text), conv_mode)
                responses[k] = pb_utils.InferenceResponse([bytes_tensor("OUTPUT", [answer])])
            except Exception as e:  # noqa: BLE001 - this request fails alone
                responses[k] = error_response(e)
        return responses

    def token_ids(self, request) -> list[int]:
        """The first beam's ids up to its length. Negative ids fail the tokenizer's decode (ids past the
        vocabulary, e.g. a padded embedding's, decode to nothing, as before)."""
        tokens = required_input(request, "TOKENS_BATCH")
        lengths = required_input(request, "SEQUENCE_LENGTH")
        if tokens.ndim != 3:
            raise InputError(f"TOKENS_BATCH must be (batch, beams, tokens), got {tokens.ndim} dimensions")
        length = int(lengths.reshape(-1)[0])
        if not 0 <= length <= tokens.shape[2]:
            raise InputError(f"SEQUENCE_LENGTH {length} is outside 0..{tokens.shape[2]}, the tokens given")
        ids = tokens[0, 0, :length]
        if ids.size and ids.min() < 0:
            raise InputError(f"token id {int(ids.min())} is negative")
        return np.asarray(ids, np.int64).tolist()
