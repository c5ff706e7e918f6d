"""The CPU LLM engine: request types (`request`), batched KV cache (`kv_cache`), prefix KV cache (`prefix_cache`), engine loop (`scheduler`)."""

from triton_models.lib.engine.kv_cache import BatchKVCache
from triton_models.lib.engine.prefix_cache import PrefixCache
from triton_models.lib.engine.request import EngineShutdown, GenerationRequest, RequestHandle, ValidRequest, validate
from triton_models.lib.engine.scheduler import LLMEngine

__all__ = [
    "BatchKVCache",
    "EngineShutdown",
    "GenerationRequest",
    "LLMEngine",
    "PrefixCache",
    "RequestHandle",
    "ValidRequest",
    "validate",
]
