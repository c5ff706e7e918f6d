"""Triton-free building blocks used inside the Triton python models (CPU LLM engine, sampling)."""

from triton_models.lib.llm_engine import EngineShutdown, GenerationRequest, LLMEngine, RequestHandle
from triton_models.lib.sampling import RowSampling, sample_next

__all__ = ["EngineShutdown", "GenerationRequest", "LLMEngine", "RequestHandle", "RowSampling", "sample_next"]
