"""Async Triton gRPC client for the OpenAI front door: variants, readiness, streamed generation.

A variant is a served `mgm_bls` model: `mgm_bls` itself (served as `--served_model_name`) or
`NAME_mgm_bls` from `mgm-build repo --name NAME` (served as NAME). It is ready when its BLS and
the models the BLS calls are all READY, so one variant failing to load leaves the others serving.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from client.openai_api.errors import APIError, bad_request, not_found, unavailable
from triton_models.launcher.argv import GRPC_ADMIN_HEADER

BLS = "mgm_bls"
PIPELINE = ("preprocessing", "vision_encoder", "tensorrt_llm", BLS)  # what one BLS request runs through
_INDEX_TTL_S = 1.0  # a repository index per request would cost a round trip on the TTFT path
# Triton's messages when the model itself is not there to serve (not the request's fault)
_NOT_SERVING = ("is not ready", "unknown model", "is not found", "unavailable")


@dataclass(frozen=True)
class Variant:
    name: str  # the OpenAI model id
    bls_model: str  # the Triton model it routes to
    ready: bool
    reason: str = ""


@dataclass
class Event:
    text: str
    completion_tokens: int
    prompt_tokens: int
    final: bool


def _variants(index: list[dict], default_name: str) -> dict[str, Variant]:
    states = {m["name"]: (m.get("state", ""), m.get("reason", "")) for m in index}
    out = {}
    for model in sorted(states):
        if not model.endswith(BLS) or (model != BLS and not model.endswith("_" + BLS)):
            continue
        prefix = model.removesuffix(BLS)
        name = prefix.removesuffix("_") or default_name
        not_ready = [(prefix + m, *states.get(prefix + m, ("MISSING", ""))) for m in PIPELINE]
        not_ready = [(m, s, r) for m, s, r in not_ready if s != "READY"]
        reason = "; ".join(f"{m} is {s.lower()}{': ' + r if r else ''}" for m, s, r in not_ready)
        out[name] = Variant(name, model, not not_ready, reason)
    return out


class TritonBackend:
    def __init__(self, url: str, default_name: str = "mgm", timeout_s: float = 600.0, admin_key: str | None = None):
        self.url, self.default_name, self.timeout_s = url, default_name, timeout_s
        # mgm-serve restricts the repository index (an admin API) to holders of its key
        self._index_headers = {GRPC_ADMIN_HEADER: admin_key} if admin_key else None
        self._client: grpcaio.InferenceServerClient | None = None
        self._cache: tuple[float, dict[str, Variant]] | None = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # made lazily, inside the server's event loop
            self._client = grpcaio.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def variants(self, fresh: bool = False) -> dict[str, Variant]:
        """Served name -> Variant; {} when Triton cannot be reached."""
        now = time.monotonic()
        if not fresh and self._cache and now - self._cache[0] < _INDEX_TTL_S:
            return self._cache[1]
        try:
            index = (
                await self.client.get_model_repository_index(
                    headers=self._index_headers, as_json=True, client_timeout=5
                )
            ).get("models", [])
        except InferenceServerException:
            index = []
        found = _variants(index, self.default_name)
        self._cache = (now, found)
        return found

    async def resolve(self, model: str) -> Variant:
        found = await self.variants()
        if model not in found or not found[model].ready:
            found = await self.variants(fresh=True)  # a variant may have just finished loading
        if model not in found:
            if not found:
                raise unavailable(f"the Triton server at {self.url} is not reachable or serves no MGM model")
            raise not_found(f"the model {model!r} does not exist; this server has {sorted(found)}", "model")
        if not found[model].ready:
            raise unavailable(f"the model {model!r} is not ready ({found[model].reason})")
        return found[model]

    async def generate(self, variant: Variant, tensors: dict[str, np.ndarray]) -> AsyncIterator[Event]:
        """The BLS's streamed responses; closing the iterator early cancels the request on the server."""
        inputs = []
        for name, value in tensors.items():
            inp = InferInput(name, [1, *value.shape], np_to_triton_dtype(value.dtype))
            inp.set_data_from_numpy(value[None])
            inputs.append(inp)

        async def requests():
            yield {
                "model_name": variant.bls_model,
                "inputs": inputs,
                "parameters": {"triton_enable_empty_final_response": True},
            }

        stream = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        done = False
        prompt_tokens = completion_tokens = 0
        try:
            async for result, error in stream:
                if error is not None:
                    raise _api_error(error.message() if callable(getattr(error, "message", None)) else str(error))
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                out = _raw_outputs(response)
                if "text_output" in out:
                    prompt_tokens = _int(out.get("prompt_token_count"), prompt_tokens)
                    completion_tokens = _int(out.get("output_token_count"), completion_tokens)
                    yield Event(_first_string(out["text_output"]), completion_tokens, prompt_tokens, final)
                elif final:
                    yield Event("", completion_tokens, prompt_tokens, True)
                if final:
                    done = True
                    return
            raise unavailable("the Triton stream ended before the answer was complete")
        except grpc.RpcError as e:
            raise unavailable(f"lost the Triton server at {self.url}: {e.code().name}") from None
        finally:
            if not done:
                stream.cancel()


# Each streamed token is one response: reading its raw bytes directly costs a fraction of
# InferResult.as_numpy's numpy round trip, and this loop is the front door's busiest code.
def _raw_outputs(response) -> dict[str, bytes]:
    return {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)}


def _first_string(raw: bytes) -> str:
    """The first element of a BYTES tensor: each element is a 4-byte little-endian length, then its bytes."""
    n = int.from_bytes(raw[:4], "little")
    return raw[4 : 4 + n].decode()


def _int(raw: bytes | None, default: int) -> int:
    """A one-element INT32/INT64 tensor's value."""
    return default if not raw else int.from_bytes(raw, "little", signed=True)


def _api_error(message: str) -> APIError:
    message = message.removeprefix("[StatusCode.INTERNAL] ").removeprefix("[StatusCode.INVALID_ARGUMENT] ")
    if any(s in message.lower() for s in _NOT_SERVING):
        return unavailable(message)
    # The BLS answers a request's own failure (its validation: prompt, images, sampling, lengths) with
    # an error response; the server itself keeps serving, so this is the request's fault.
    return bad_request(message)
