"""Business-logic-scripting calls from a python model: forward inputs, rename outputs, await answers.

Like `triton_io`, this module talks to the python backend (imported lazily, so the library stays
importable without a server).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from triton_models.lib.triton_io import pb


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
    return [pb_utils.Tensor(new, pb_utils.get_output_tensor_by_name(response, old).as_numpy())
            for old, new in mapping.items()]


async def call(model: str, inputs: list, outputs: list[str]):
    """One response of `model`; RuntimeError with the callee's message when it failed."""
    response = await pb().InferenceRequest(model_name=model, inputs=inputs,
                                           requested_output_names=outputs).async_exec()
    if response.has_error():
        raise RuntimeError(response.error().message())
    return response


class StreamedTokens:
    """The `output_ids` of a decoupled call, as `pipeline.TokenStream`. The response iterator blocks,
    so it is read in `waiters`. This python backend cannot cancel a BLS stream: `close()` stops
    reading; the callee ends the generation at its own stop conditions."""

    def __init__(self, responses, waiters: ThreadPoolExecutor, output: str = "output_ids"):
        self.responses, self.waiters, self.output = responses, waiters, output

    async def next(self) -> list[int] | None:
        loop = asyncio.get_running_loop()
        while True:
            response = await loop.run_in_executor(self.waiters, next, self.responses, None)
            if response is None:
                return None
            if response.has_error():
                raise RuntimeError(response.error().message())
            tokens = pb().get_output_tensor_by_name(response, self.output)
            if tokens is not None:  # else: the empty final response
                return tokens.as_numpy().reshape(-1).tolist()

    def close(self) -> None:
        self.responses = iter(())
