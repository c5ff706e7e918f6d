"""Business-logic-scripting calls from a python model: forward inputs, rename outputs, await answers.

Like `triton_io`, this module talks to the python backend (imported lazily, so the library stays
importable without a server).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from triton_models.lib.triton_io import ModelCallError, pb

log = logging.getLogger(__name__)


def forward(request, mapping: dict[str, str]) -> list:
    """The request's inputs named in `mapping` (its name -> the callee's name), those present."""
    pb_utils = pb()
    tensors = []
    for client_name, model_name in mapping.items():
        t = pb_utils.get_input_tensor_by_name(request, client_name)
        if t is not None:
            tensors.append(pb_utils.Tensor(model_name, t.as_numpy()))
    return tensors


def rename(response, mapping: dict[str, str]) -> list:
    """A response's outputs as input tensors for the next model (old name -> new name)."""
    pb_utils = pb()
    return [
        pb_utils.Tensor(new, pb_utils.get_output_tensor_by_name(response, old).as_numpy())
        for old, new in mapping.items()
    ]


def prompt_table_inputs(vision_response) -> list:
    """The image rows for tensorrt_llm, or nothing for a text-only request (no 0-row table).
    DLPack carries the table in whatever dtype it has: a bf16 table has no numpy form."""
    pb_utils = pb()
    rows = int(pb_utils.get_output_tensor_by_name(vision_response, "OUT_PROMPT_VOCAB_SIZE").as_numpy().reshape(-1)[0])
    if rows == 0:
        return []
    table = pb_utils.get_output_tensor_by_name(vision_response, "OUT_PROMPT_EMBEDDING_TABLE")
    return [
        pb_utils.Tensor.from_dlpack("prompt_embedding_table", table.to_dlpack()),
        pb_utils.Tensor("prompt_vocab_size", np.array([[rows]], np.int32)),
    ]


async def call(model: str, inputs: list, outputs: list[str]):
    """One response of `model`; ModelCallError (a RuntimeError) with the callee's message when it failed."""
    response = await pb().InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs).async_exec()
    if response.has_error():
        raise ModelCallError(response.error().message())
    return response


class StreamedTokens:
    """The `output_ids` of a decoupled tensorrt_llm call, as `pipeline.TokenStream`.

    The response iterator blocks, so it is read in `waiters`. This python backend cannot cancel a BLS
    stream, so `close()` before the end sends TensorRT-LLM's `stop` request (same request id) to end
    the generation and free its slot. The stream is still read to its final response, in a waiter:
    the stub frees a BLS stream's state only then, and an iterator dropped unfinished stays in the
    stub, its destructor reading (and blocking) wherever its last reference goes, which at stub
    shutdown is a thread without the GIL.
    """

    def __init__(
        self, responses, waiters: ThreadPoolExecutor, model: str, request_id: str, outputs: list[str] | None = None
    ):
        # the token ids come in the first output; the others are requested because the backend needs them
        self.outputs = outputs or ["output_ids"]
        self.responses, self.waiters, self.output = responses, waiters, self.outputs[0]
        self.model, self.request_id = model, request_id
        self.finished = False

    async def next(self) -> list[int] | None:
        loop = asyncio.get_running_loop()
        while True:
            response = await loop.run_in_executor(self.waiters, next, self.responses, None)
            if response is None:
                self.finished = True
                return None
            if response.has_error():
                self.finished = True
                raise ModelCallError(response.error().message())
            tokens = pb().get_output_tensor_by_name(response, self.output)
            if tokens is not None:  # else: the empty final response
                return tokens.as_numpy().reshape(-1).tolist()

    async def close(self) -> None:
        if self.finished:
            self.responses = iter(())
            return
        self.finished = True
        pb_utils = pb()
        # the required inputs must be present; the model only reads `stop` and the request id
        inputs = [
            pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
            pb_utils.Tensor("input_lengths", np.ones((1, 1), np.int32)),
            pb_utils.Tensor("request_output_len", np.ones((1, 1), np.int32)),
            pb_utils.Tensor("stop", np.array([[True]])),
        ]
        request = pb_utils.InferenceRequest(
            model_name=self.model, inputs=inputs, request_id=self.request_id, requested_output_names=self.outputs
        )
        try:  # the answer is complete either way: a failed stop only lets the generation run on
            for response in await request.async_exec(decoupled=True):
                if response.has_error():
                    log.warning(
                        "stopping %s request %r failed: %s", self.model, self.request_id, response.error().message()
                    )
        except Exception as e:  # noqa: BLE001 - e.g. a model without the `stop` input; logged, not raised
            log.warning("stopping %s request %r failed: %s", self.model, self.request_id, e)
        # the generation ends within a step of the stop (or at its max_tokens without one)
        try:
            self.waiters.submit(_read_to_end, self.responses, self.model, self.request_id)
        except RuntimeError:  # the model is being unloaded (its waiters are shut down)
            pass
        self.responses = iter(())


def _read_to_end(responses, model: str, request_id: str) -> None:
    try:
        for _ in responses:
            pass
    except Exception as e:  # noqa: BLE001 - nothing waits for these responses any more
        log.warning("reading the rest of %s request %r failed: %s", model, request_id, e)
