"""Triton glue for triton_models.lib.vision_runner: all images of a batch of requests run together."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_models.lib.triton_io import (
    InputError,
    check_config,
    error_response,
    optional_input,
    params_of,
    per_request,
    use_utf8_locale,
)
from triton_models.lib.vision_runner import VisionRunner


class TritonPythonModel:
    def initialize(self, args):
        use_utf8_locale()
        config = json.loads(args["model_config"])
        params = params_of(config)
        threads = int(params.get("threads") or 0) or None
        self.runner = VisionRunner.from_dir(params["vision_dir"], threads)
        check_config(
            config,
            decoupled=False,
            inputs={"IMAGES": "TYPE_FP32", "IMAGES_AUX": "TYPE_FP32"},
            outputs={"OUT_PROMPT_VOCAB_SIZE": "TYPE_INT32"},
            dims={"OUT_PROMPT_EMBEDDING_TABLE": [-1, self.runner.hidden_size]},
        )
        # The table goes to the LLM in the engine's dtype (TensorRT-LLM rejects any other): fp32 on the
        # CPU path, fp16 or bf16 for TensorRT-LLM. numpy has no bf16, so that one leaves through DLPack.
        out = pb_utils.get_output_config_by_name(config, "OUT_PROMPT_EMBEDDING_TABLE")
        self.table_type = out["data_type"]
        self.table_dtype = None if self.table_type == "TYPE_BF16" else pb_utils.triton_string_to_numpy(self.table_type)

    def execute(self, requests):
        responses, kept = per_request(requests, read_images)  # bad tensors fail their request alone
        if not kept:
            return responses
        try:
            feats = self.runner(np.concatenate([i for _, (i, _) in kept]), np.concatenate([a for _, (_, a) in kept]))
        except Exception as e:  # noqa: BLE001 - the whole batch failed in one call: tell every request
            for k, _ in kept:
                responses[k] = error_response(e)
            return responses
        start = 0
        for k, (img, _) in kept:
            rows = feats[start : start + len(img)].reshape(-1, feats.shape[-1])
            start += len(img)
            responses[k] = pb_utils.InferenceResponse(
                [
                    self.table_tensor(rows[None]),
                    pb_utils.Tensor("OUT_PROMPT_VOCAB_SIZE", np.array([[rows.shape[0]]], np.int32)),
                ]
            )
        return responses

    def table_tensor(self, rows: np.ndarray):
        if self.table_dtype is not None:
            return pb_utils.Tensor("OUT_PROMPT_EMBEDDING_TABLE", rows.astype(self.table_dtype))
        import torch  # bf16 only: the tensor crosses as DLPack, as numpy cannot hold it

        table = torch.from_numpy(np.ascontiguousarray(rows, np.float32)).to(torch.bfloat16)
        return pb_utils.Tensor.from_dlpack("OUT_PROMPT_EMBEDDING_TABLE", torch.utils.dlpack.to_dlpack(table))


def read_images(request) -> tuple[np.ndarray, np.ndarray]:
    """One request's (IMAGES, IMAGES_AUX), without the batch dim; one aux view per image."""
    images, aux = optional_input(request, "IMAGES"), optional_input(request, "IMAGES_AUX")
    if images is None or aux is None:
        raise InputError("the request needs both IMAGES and IMAGES_AUX")
    if len(images[0]) != len(aux[0]):
        raise InputError(f"IMAGES holds {len(images[0])} images but IMAGES_AUX {len(aux[0])}")
    return images[0], aux[0]
