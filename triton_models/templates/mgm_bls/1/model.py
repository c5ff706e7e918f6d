"""Streaming BLS: preprocessing -> vision_encoder -> tensorrt_llm, text deltas as tokens arrive.

`async def execute` handles each request in its own task, so one slow stream never holds up
another (PLATFORM_NOTES §3b); the LLM model batches the concurrent streams in flight.
"""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from mgm_ref.config import MGMConfig
from mgm_ref.conversation import default_conv_mode, get_template
from mgm_ref.loader import load_tokenizer
from triton_models.lib.detokenize import IncrementalDetokenizer
from triton_models.lib.triton_io import bytes_tensor, error_response, params_of, scalar_input, string_input

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# A variant added with `mgm-build repo --name X` is deployed as X_mgm_bls beside X_preprocessing etc.
PREFIX = ""
# client input -> (model, its input name) for the inputs forwarded unchanged
PREPROCESS_INPUTS = {"text_input": "QUERY", "image_input": "IMAGE", "image_sizes": "IMAGE_SIZES",
                     "history": "HISTORY", "conv_mode": "CONV_MODE", "system_prompt": "SYSTEM_PROMPT",
                     "max_tokens": "REQUEST_OUTPUT_LEN"}
LLM_INPUTS = {"max_tokens": "request_output_len", "temperature": "temperature", "top_p": "runtime_top_p",
              "top_k": "runtime_top_k", "seed": "random_seed"}


def forward(request, mapping):
    tensors = []
    for client_name, model_name in mapping.items():
        t = pb_utils.get_input_tensor_by_name(request, client_name)
        if t is not None:
            tensors.append(pb_utils.Tensor(model_name, t.as_numpy()))
    return tensors


def rename(response, mapping):
    return [pb_utils.Tensor(new, pb_utils.get_output_tensor_by_name(response, old).as_numpy())
            for old, new in mapping.items()]


async def call(model, inputs, outputs):
    # `model` is a bare name; TritonPythonModel.initialize sets the variant's prefix
    response = await pb_utils.InferenceRequest(model_name=PREFIX + model, inputs=inputs,
                                               requested_output_names=outputs).async_exec()
    if response.has_error():
        raise RuntimeError(response.error().message())
    return response


class TritonPythonModel:
    def initialize(self, args):
        global PREFIX
        PREFIX = args["model_name"].removesuffix("mgm_bls")
        params = params_of(json.loads(args["model_config"]))
        self.tokenizer = load_tokenizer(params["model_dir"])
        self.default_conv_mode = default_conv_mode(MGMConfig.from_model_dir(params["model_dir"]).family,
                                                   self.tokenizer)
        # Each open stream parks one thread in the blocking response iterator; asyncio's default
        # executor has only cpu_count + 4 threads, so it would cap (and stall) concurrent streams.
        self.waiters = ThreadPoolExecutor(max_workers=256, thread_name_prefix="mgm_bls_stream")

    async def execute(self, requests):
        await asyncio.gather(*(self.serve(r) for r in requests))
        return None

    async def serve(self, request):
        sender = request.get_response_sender()
        try:
            await self.generate(request, sender)
        except Exception as e:  # noqa: BLE001 - this request fails alone; the server keeps serving
            sender.send(error_response(e), flags=FINAL)

    async def generate(self, request, sender):
        start = time.perf_counter()
        stream = bool(scalar_input(request, "stream", False))
        conv_mode = string_input(request, "conv_mode") or self.default_conv_mode
        pre = await call("preprocessing", forward(request, PREPROCESS_INPUTS),
                         ["INPUT_ID", "REQUEST_INPUT_LEN", "IMAGES", "IMAGES_AUX", "END_ID", "STOP_WORDS_IDS"])
        vis = await call("vision_encoder", rename(pre, {"IMAGES": "IMAGES", "IMAGES_AUX": "IMAGES_AUX"}),
                         ["OUT_PROMPT_EMBEDDING_TABLE", "OUT_PROMPT_VOCAB_SIZE"])
        llm_inputs = forward(request, LLM_INPUTS) + rename(pre, {
            "INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths", "END_ID": "end_id",
            "STOP_WORDS_IDS": "stop_words_list"}) + rename(vis, {
            "OUT_PROMPT_EMBEDDING_TABLE": "prompt_embedding_table", "OUT_PROMPT_VOCAB_SIZE": "prompt_vocab_size"})
        llm_inputs.append(pb_utils.Tensor("streaming", np.array([[True]])))
        responses = await pb_utils.InferenceRequest(
            model_name=PREFIX + "tensorrt_llm", inputs=llm_inputs, requested_output_names=["output_ids"]
        ).async_exec(decoupled=True)

        detok = IncrementalDetokenizer(self.tokenizer, get_template(conv_mode).stop_strings)
        loop = asyncio.get_running_loop()
        ttft, n_tokens, sent_any = None, 0, False
        n_prompt = int(pb_utils.get_output_tensor_by_name(pre, "REQUEST_INPUT_LEN").as_numpy().reshape(-1)[0])
        while True:
            response = await loop.run_in_executor(self.waiters, next, responses, None)  # the iterator blocks
            if response is None:
                break
            if response.has_error():
                raise RuntimeError(response.error().message())
            tokens = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if tokens is None:  # the empty FINAL response
                continue
            ids = tokens.as_numpy().reshape(-1).tolist()
            if ids and ttft is None:
                ttft = (time.perf_counter() - start) * 1000
            n_tokens += len(ids)
            delta = detok.push(ids)
            if stream and delta and not request.is_cancelled():
                if not sent_any:
                    delta = delta.lstrip()
                if delta:
                    sender.send(self.response(delta, n_tokens, ttft, n_prompt))
                    sent_any = True
            if detok.stopped:
                break
        rest = detok.finish()
        if stream:  # the last piece; the answer's leading spaces were dropped from the first piece
            text = rest if sent_any else rest.lstrip()
        else:
            text = detok.emitted.strip()
        sender.send(self.response(text, n_tokens, ttft, n_prompt), flags=FINAL)

    @staticmethod
    def response(text, n_tokens, ttft, n_prompt):
        return pb_utils.InferenceResponse([
            bytes_tensor("text_output", [text]),
            pb_utils.Tensor("output_token_count", np.array([[n_tokens]], np.int32)),
            pb_utils.Tensor("time_to_first_token_ms", np.array([[ttft or 0.0]], np.float32)),
            pb_utils.Tensor("prompt_token_count", np.array([[n_prompt]], np.int32)),
        ])
