"""Triton glue for triton_models.lib.image_encoder: the images of a batch of requests are looked up in
the feature cache, and the misses run together; the cache's counters are Triton custom metrics."""

import json
from dataclasses import asdict

import numpy as np
import triton_python_backend_utils as pb_utils

from mgm_ref.errors import MGMError
from triton_models.lib.image_encoder import MB, ImageFeatureEncoder
from triton_models.lib.metrics import StatsMetrics
from triton_models.lib.preprocess import split_images
from triton_models.lib.triton_io import check_config, error_response, optional_input, params_of, use_utf8_locale
from triton_models.lib.vision_runner import VisionRunner

# metric name -> (kind, description, the CacheStats field it reports)
CACHE_METRICS = {
    "mgm_image_cache_hits_total": ("COUNTER", "Images whose features came from the image-feature cache", "hits"),
    "mgm_image_cache_misses_total": ("COUNTER", "Images looked up in the image-feature cache and not found", "misses"),
    "mgm_image_cache_evictions_total": (
        "COUNTER",
        "Image-feature cache entries evicted to stay in budget",
        "evictions",
    ),
    "mgm_image_cache_bytes": ("GAUGE", "Bytes of image features the image-feature cache holds", "bytes"),
    "mgm_image_cache_entries": ("GAUGE", "Images the image-feature cache holds", "entries"),
    "mgm_image_cache_budget_bytes": ("GAUGE", "The image-feature cache's byte budget (0: off)", "budget_bytes"),
}


class TritonPythonModel:
    def initialize(self, args):
        use_utf8_locale()
        config = json.loads(args["model_config"])
        params = params_of(config)
        threads = int(params.get("threads") or 0) or None
        runner = VisionRunner.from_dir(params["vision_dir"], threads)
        check_config(
            config,
            decoupled=False,
            inputs={"IMAGE_BYTES": "TYPE_UINT8", "IMAGE_BYTE_SIZES": "TYPE_INT32"},
            outputs={"OUT_PROMPT_VOCAB_SIZE": "TYPE_INT32"},
            dims={"OUT_PROMPT_EMBEDDING_TABLE": [-1, runner.hidden_size]},
        )
        cache_bytes = int(float(params["image_cache_mb"]) * MB)
        self.encoder = ImageFeatureEncoder.for_checkpoint(params["model_dir"], runner, cache_bytes)
        labels = {"model": args.get("model_name", config["name"]), "version": str(args.get("model_version", ""))}
        self.metrics = StatsMetrics(CACHE_METRICS, labels)
        self.metrics.update(asdict(self.encoder.cache.stats()))
        # The table goes to the LLM in the engine's dtype (TensorRT-LLM rejects any other): fp32 on the
        # CPU path, fp16 or bf16 for TensorRT-LLM. numpy has no bf16, so that one leaves through DLPack.
        out = pb_utils.get_output_config_by_name(config, "OUT_PROMPT_EMBEDDING_TABLE")
        self.table_type = out["data_type"]
        self.table_dtype = None if self.table_type == "TYPE_BF16" else pb_utils.triton_string_to_numpy(self.table_type)

    def execute(self, requests):
        images, errors = [], {}
        for i, r in enumerate(requests):
            try:
                images.append(split_images(optional_input(r, "IMAGE_BYTES"), optional_input(r, "IMAGE_BYTE_SIZES")))
            except MGMError as e:
                errors[i] = e
                images.append([])
        try:
            results = iter(self.encoder([imgs for i, imgs in enumerate(images) if i not in errors]))
        except Exception as e:  # noqa: BLE001 - the batch failed in one call: tell every request
            return [error_response(e) for _ in requests]
        finally:
            self.metrics.update(asdict(self.encoder.cache.stats()))
        return [self.respond(errors[i] if i in errors else next(results)) for i in range(len(requests))]

    def respond(self, result):
        if isinstance(result, Exception):
            return error_response(result)
        rows = result.reshape(-1, result.shape[-1])
        return pb_utils.InferenceResponse(
            [
                self.table_tensor(rows[None]),
                pb_utils.Tensor("OUT_PROMPT_VOCAB_SIZE", np.array([[rows.shape[0]]], np.int32)),
            ]
        )

    def table_tensor(self, rows: np.ndarray):
        if self.table_dtype is not None:
            return pb_utils.Tensor("OUT_PROMPT_EMBEDDING_TABLE", rows.astype(self.table_dtype, copy=False))
        import torch  # bf16 only: the tensor crosses as DLPack, as numpy cannot hold it

        table = torch.from_numpy(np.ascontiguousarray(rows, np.float32)).to(torch.bfloat16)
        return pb_utils.Tensor.from_dlpack("OUT_PROMPT_EMBEDDING_TABLE", torch.utils.dlpack.to_dlpack(table))

    def finalize(self):
        self.metrics.close()
