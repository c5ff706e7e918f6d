"""Triton glue: detokenize every request of a batch with one batch_decode, trim stop strings."""

import json

from mgm_ref.conversation import default_conv_mode, trim_answer
from mgm_ref.config import MGMConfig
from mgm_ref.loader import load_tokenizer
from triton_models.lib.triton_io import bytes_tensor, error_response, optional_input, params_of, pb


class TritonPythonModel:
    def initialize(self, args):
        params = params_of(json.loads(args["model_config"]))
        self.tokenizer = load_tokenizer(params["model_dir"])
        family = MGMConfig.from_model_dir(params["model_dir"]).family
        self.default_conv_mode = default_conv_mode(family, self.tokenizer)

    def execute(self, requests):
        pb_utils = pb()
        try:
            seqs = []
            for r in requests:
                tokens, lengths = optional_input(r, "TOKENS_BATCH")[0], optional_input(r, "SEQUENCE_LENGTH")[0]
                seqs.append(tokens[0, : int(lengths[0])].tolist())
            texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        except Exception as e:  # noqa: BLE001
            return [error_response(e) for _ in requests]
        responses = []
        for text in texts:
            try:
                responses.append(pb_utils.InferenceResponse(
                    [bytes_tensor("OUTPUT", [trim_answer(text, self.default_conv_mode)])]))
            except Exception as e:  # noqa: BLE001
                responses.append(error_response(e))
        return responses
