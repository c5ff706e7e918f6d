"""Triton glue for triton_models.lib.preprocess.Preprocessor (one response per request)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mgm_ref.constants import text_bytes_limit
from triton_models.lib.preprocess import Preprocessor, parse_history, split_images
from triton_models.lib.triton_io import (
    check_config,
    error_response,
    max_tokens_input,
    optional_input,
    params_of,
    string_input,
    use_utf8_locale,
)


class TritonPythonModel:
    def initialize(self, args):
        use_utf8_locale()
        config = json.loads(args["model_config"])
        params = params_of(config)
        self.max_seq_len = int(params["max_seq_len"])
        self.max_input_len = int(params["max_input_len"])
        self.preprocessor = Preprocessor(
            params["model_dir"],
            int(params["max_input_len"]),
            int(params["max_images_per_request"]),
            vocab_offset=int(params["vocab_offset"]),
        )
        check_config(
            config,
            decoupled=False,
            inputs={
                "QUERY": "TYPE_STRING",
                "IMAGE": "TYPE_UINT8",
                "IMAGE_SIZES": "TYPE_INT32",
                "HISTORY": "TYPE_STRING",
                "CONV_MODE": "TYPE_STRING",
                "REQUEST_OUTPUT_LEN": "TYPE_INT32",
            },
            outputs={
                "INPUT_ID": "TYPE_INT32",
                "REQUEST_INPUT_LEN": "TYPE_INT32",
                "IMAGE_BYTES": "TYPE_UINT8",
                "IMAGE_BYTE_SIZES": "TYPE_INT32",
                "PROMPT_TABLE_EXTRA_IDS": "TYPE_UINT64",
                "END_ID": "TYPE_INT32",
                "STOP_WORDS_IDS": "TYPE_INT32",
            },
            dims={"IMAGE_BYTES": [-1], "IMAGE_BYTE_SIZES": [-1], "PROMPT_TABLE_EXTRA_IDS": [-1]},
        )

    def execute(self, requests):
        return [self.handle(request) for request in requests]

    def handle(self, request):
        try:
            output_len = max_tokens_input(request, "REQUEST_OUTPUT_LEN")  # before any image is decoded
            query = string_input(request, "QUERY")
            images = split_images(optional_input(request, "IMAGE"), optional_input(request, "IMAGE_SIZES"))
            history = parse_history(string_input(request, "HISTORY"), 6 * text_bytes_limit(self.max_input_len))
            inputs = self.preprocessor(
                query,
                images,
                history,
                string_input(request, "CONV_MODE"),
                string_input(request, "SYSTEM_PROMPT"),
            )
            if len(inputs.input_ids) + output_len > self.max_seq_len:
                raise ValueError(
                    f"prompt ({len(inputs.input_ids)} tokens) + max_tokens ({output_len}) exceeds "
                    f"max_seq_len ({self.max_seq_len})"
                )
            tensors = {
                "INPUT_ID": inputs.input_ids[None],
                "REQUEST_INPUT_LEN": np.array([[len(inputs.input_ids)]], np.int32),
                "IMAGE_BYTES": inputs.image_bytes[None],
                "IMAGE_BYTE_SIZES": inputs.image_sizes[None],
                "PROMPT_TABLE_EXTRA_IDS": inputs.extra_ids[None],
                "END_ID": np.array([[inputs.end_id]], np.int32),
                "STOP_WORDS_IDS": inputs.stop_words[None],
            }
            return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()])
        except Exception as e:  # noqa: BLE001 - every failure becomes this request's error, never the batch's
            return error_response(e)
