"""Triton glue: detokenize every request of a batch with one batch_decode, trim each request's own
template's stop strings (its CONV_MODE, else the model's default)."""

import json

from mgm_ref.conversation import trim_answer
from mgm_ref.loader import load_tokenizer
from triton_models.lib.chat import ChatTemplates
from triton_models.lib.triton_io import (
    bytes_tensor,
    check_config,
    error_response,
    optional_input,
    params_of,
    pb,
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
        try:
            seqs = []
            for r in requests:
                tokens, lengths = optional_input(r, "TOKENS_BATCH")[0], optional_input(r, "SEQUENCE_LENGTH")[0]
                seqs.append(tokens[0, : int(lengths[0])].tolist())
            texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        except Exception as e:  # noqa: BLE001 - one decode call for the batch: every request gets its error
            return [error_response(e) for _ in requests]
        responses = []
        for request, text in zip(requests, texts, strict=True):
            try:
                conv_mode = self.templates.resolve(string_input(request, "CONV_MODE"))
                responses.append(pb_utils.InferenceResponse([bytes_tensor("OUTPUT", [trim_answer(text, conv_mode)])]))
            except Exception as e:  # noqa: BLE001 - this request fails alone
                responses.append(error_response(e))
        return responses
