"""Small helpers shared by the python models: reading optional inputs, parameters, error responses.

The only module of triton_models.lib that touches the python backend (imported lazily, so the rest
of the library stays importable and testable without a server).
"""

from __future__ import annotations

import numpy as np


def pb():
    import triton_python_backend_utils as pb_utils
    return pb_utils


def params_of(model_config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def string_input(request, name: str) -> str | None:
    """First element of a TYPE_STRING input as text (None when absent)."""
    array = optional_input(request, name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def scalar_input(request, name: str, default=None):
    array = optional_input(request, name)
    return default if array is None or array.size == 0 else array.reshape(-1)[0].item()


def error_response(exc: BaseException):
    """An InferenceResponse carrying the error's message (the server keeps serving)."""
    pb_utils = pb()
    message = str(exc) if str(exc) else type(exc).__name__
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def bytes_tensor(name: str, texts: list[str]):
    """A TYPE_STRING output of one request: shape (1, len(texts)), the leading 1 is the batch dim."""
    return pb().Tensor(name, np.array([[t.encode("utf-8") for t in texts]], dtype=np.object_))
