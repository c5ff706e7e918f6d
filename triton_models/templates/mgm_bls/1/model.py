"""Streaming BLS: Triton glue for triton_models.lib.pipeline (preprocessing -> vision_encoder ->
tensorrt_llm, text deltas as tokens arrive).

`async def execute` handles each request in its own task, so one slow stream never holds up another;
every response is sent from the event loop.
"""

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from mgm_ref.loader import load_tokenizer
from triton_models.lib.bls import StreamedTokens, call, forward, prompt_table_inputs, rename
from triton_models.lib.chat import ChatTemplates
from triton_models.lib.metrics import RequestMetrics
from triton_models.lib.pipeline import AnswerText, Piece, run_answer
from triton_models.lib.triton_io import (
    bytes_tensor,
    check_config,
    error_response,
    params_of,
    scalar_input,
    string_input,
    use_utf8_locale,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# client input -> the model's input name, for the inputs forwarded unchanged
PREPROCESS_INPUTS = {
    "text_input": "QUERY",
    "image_input": "IMAGE",
    "image_sizes": "IMAGE_SIZES",
    "history": "HISTORY",
    "conv_mode": "CONV_MODE",
    "system_prompt": "SYSTEM_PROMPT",
    "max_tokens": "REQUEST_OUTPUT_LEN",
}
LLM_INPUTS = {
    "max_tokens": "request_output_len",
    "temperature": "temperature",
    "top_p": "runtime_top_p",
    "top_k": "runtime_top_k",
    "seed": "seed",
}
PRE_TO_LLM = {
    "INPUT_ID": "input_ids",
    "REQUEST_INPUT_LEN": "input_lengths",
    "END_ID": "end_id",
    "STOP_WORDS_IDS": "stop_words_list",
}
PRE_TO_VISION = {"IMAGE_BYTES": "IMAGE_BYTES", "IMAGE_BYTE_SIZES": "IMAGE_BYTE_SIZES"}
PRE_TO_LLM_EXTRA_IDS = {"PROMPT_TABLE_EXTRA_IDS": "prompt_table_extra_ids"}
VISION_OUTPUTS = ["OUT_PROMPT_EMBEDDING_TABLE", "OUT_PROMPT_VOCAB_SIZE"]
# the tensorrtllm backend fails a response unless both of these outputs are requested
LLM_OUTPUTS = ["output_ids", "sequence_length"]
# Each open stream parks one thread in the blocking response iterator; asyncio's default executor has
# only cpu_count + 4 threads, so it would cap (and stall) concurrent streams.
STREAM_WAITERS = 256


class Stages:
    """pipeline.Stages over BLS calls to the repository's models.

    `prefix` names this variant's models: one added with `mgm-build repo --name X` is deployed as
    X_mgm_bls beside X_preprocessing, X_vision_encoder and X_tensorrt_llm.
    """

    def __init__(self, request, waiters: ThreadPoolExecutor, prefix: str, send_extra_ids: bool = False):
        self.request, self.waiters, self.prefix = request, waiters, prefix
        self.to_llm = {**PRE_TO_LLM, **(PRE_TO_LLM_EXTRA_IDS if send_extra_ids else {})}
        self.prompt_tokens = 0  # image rows included, as preprocessing counted them

    async def preprocess(self):
        pre = await call(
            self.prefix + "preprocessing", forward(self.request, PREPROCESS_INPUTS), [*self.to_llm, *PRE_TO_VISION]
        )
        self.prompt_tokens = int(pb_utils.get_output_tensor_by_name(pre, "REQUEST_INPUT_LEN").as_numpy().reshape(-1)[0])
        return pre

    async def encode(self, pre):
        return await call(self.prefix + "vision_encoder", rename(pre, PRE_TO_VISION), VISION_OUTPUTS)

    async def generate(self, pre, vis):
        inputs = forward(self.request, LLM_INPUTS) + rename(pre, self.to_llm) + prompt_table_inputs(vis)
        inputs.append(pb_utils.Tensor("streaming", np.array([[True]])))
        request_id = f"mgm_bls-{uuid.uuid4().hex}"  # names the generation for a `stop` request
        llm = self.prefix + "tensorrt_llm"
        responses = await pb_utils.InferenceRequest(
            model_name=llm, inputs=inputs, request_id=request_id, requested_output_names=LLM_OUTPUTS
        ).async_exec(decoupled=True)
        return StreamedTokens(responses, self.waiters, llm, request_id, LLM_OUTPUTS)


class TritonPythonModel:
    def initialize(self, args):
        use_utf8_locale()
        config = json.loads(args["model_config"])
        check_config(
            config,
            decoupled=True,
            inputs={"text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32"},
            outputs={
                "text_output": "TYPE_STRING",
                "output_token_count": "TYPE_INT32",
                "time_to_first_token_ms": "TYPE_FP32",
            },
        )
        params = params_of(config)
        self.prefix = args["model_name"].removesuffix("mgm_bls")
        self.send_extra_ids = params.get("llm_takes_extra_ids", "false").lower() == "true"
        self.tokenizer = load_tokenizer(params["model_dir"])
        self.templates = ChatTemplates(params["model_dir"], self.tokenizer)
        self.waiters = ThreadPoolExecutor(max_workers=STREAM_WAITERS, thread_name_prefix="mgm_bls_stream")
        self.metrics = RequestMetrics(args["model_name"])  # Triton does not count a decoupled model's errors

    async def execute(self, requests):
        await asyncio.gather(*(self.serve(r) for r in requests))
        return None

    async def serve(self, request):
        sender = request.get_response_sender()

        stages = Stages(request, self.waiters, self.prefix, self.send_extra_ids)

        cancelled = False

        def send(piece: Piece):
            nonlocal cancelled
            if piece.final:
                # asked before the final response: after it the request is released, and asking then
                # crashes tritonserver (in TRITONBACKEND_ResponseFactoryIsCancelled)
                cancelled = request.is_cancelled()
                sender.send(self.response(piece, stages.prompt_tokens), flags=FINAL)
            elif not request.is_cancelled():
                sender.send(self.response(piece, stages.prompt_tokens))

        try:
            text = AnswerText(
                self.tokenizer,
                self.templates.stop_strings(string_input(request, "conv_mode")),
                stream=bool(scalar_input(request, "stream", False)),
            )
            await run_answer(stages, text, send, request.is_cancelled)
        except Exception as e:  # noqa: BLE001 - this request fails alone; the server keeps serving
            if request.is_cancelled():
                self.metrics.cancelled()
            else:
                self.metrics.failed(e)
            sender.send(error_response(e), flags=FINAL)
            return
        if cancelled:
            self.metrics.cancelled()

    @staticmethod
    def response(piece: Piece, prompt_tokens: int):
        return pb_utils.InferenceResponse(
            [
                bytes_tensor("text_output", [piece.text]),
                pb_utils.Tensor("output_token_count", np.array([[piece.tokens]], np.int32)),
                pb_utils.Tensor("time_to_first_token_ms", np.array([[piece.ttft_ms]], np.float32)),
                pb_utils.Tensor("prompt_token_count", np.array([[prompt_tokens]], np.int32)),
            ]
        )

    def finalize(self):
        self.waiters.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
