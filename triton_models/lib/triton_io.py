"""Small helpers shared by the python models: reading optional inputs, parameters, error responses.

The only module of triton_models.lib that touches the python backend (imported lazily, so the rest
of the library stays importable and testable without a server).
"""

from __future__ import annotations

import locale
import logging

import numpy as np

from mgm_ref.errors import MGMError

log = logging.getLogger(__name__)


class InputError(MGMError):
    """A request to a model lacks an input or carries one it cannot use (named in the message)."""


class ModelCallError(MGMError, RuntimeError):
    """A model called from another answered with an error; its message (already user-facing) is kept."""


def use_utf8_locale() -> None:
    """Make text files default to UTF-8 in this python-backend stub process.

    The stub embeds Python with an isolated configuration: it ignores LANG, LC_ALL and PYTHONUTF8 and
    leaves LC_CTYPE at "C", so `open()` defaults to ASCII and transformers reading its own source files
    (e.g. in set_attn_implementation) fails. Each model calls this first in `initialize`; the stub
    process is the model's, so no library import changes the locale.
    """
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue


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


def required_input(request, name: str) -> np.ndarray:
    """An input the model cannot do without, as numpy; InputError naming it when absent or empty."""
    array = optional_input(request, name)
    if array is None or array.size == 0:
        raise InputError(f"the request has no {name} input (or it is empty)")
    return array


def scalar_input(request, name: str, default=None):
    array = optional_input(request, name)
    return default if array is None or array.size == 0 else array.reshape(-1)[0].item()


def max_tokens_input(request, name: str) -> int:
    """The client's `max_tokens`, which reaches this model as input `name`; errors use the client's name."""
    value = scalar_input(request, name)
    if value is None:
        raise InputError("max_tokens is required")
    if int(value) < 1:
        raise InputError(f"max_tokens must be at least 1, got {int(value)}")
    return int(value)


def user_message(exc: BaseException) -> str:
    """The text a client sees for `exc`. Errors of the request (MGMError, and the ValueErrors input
    validation raises) keep their message; anything else is a bug whose message may show Python
    internals ("'NoneType' object is not subscriptable"), so the client gets its kind and the server
    log gets the traceback."""
    if isinstance(exc, (MGMError, ValueError)) and str(exc):
        return str(exc)
    log.error("internal error while serving a request", exc_info=exc)
    return f"internal error ({type(exc).__name__}); the server log has the details"


def error_response(exc: BaseException):
    """An InferenceResponse carrying the error's message (the server keeps serving)."""
    pb_utils = pb()
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(user_message(exc)))


def per_request(requests, read) -> tuple[list, list[tuple[int, object]]]:
    """`read(request)` for each request of a dynamic batch, before the batch's one shared call: a
    request whose tensors it refuses gets its error response here and is left out, so it fails alone.
    Returns (responses with those errors filled in, [(index, what read returned)] of the others)."""
    responses: list = [None] * len(requests)
    kept = []
    for k, request in enumerate(requests):
        try:
            kept.append((k, read(request)))
        except Exception as e:  # noqa: BLE001 - this request fails alone
            responses[k] = error_response(e)
    return responses, kept


def bytes_tensor(name: str, texts: list[str]):
    """A TYPE_STRING output of one request: shape (1, len(texts)), the leading 1 is the batch dim."""
    return pb().Tensor(name, np.array([[t.encode("utf-8") for t in texts]], dtype=np.object_))


class ModelConfigError(MGMError):
    """A model's config.pbtxt does not match what its model.py serves."""


def check_config(
    config: dict,
    decoupled: bool,
    inputs: dict[str, str] | None = None,
    outputs: dict[str, str] | None = None,
    dims: dict[str, list[int]] | None = None,
) -> None:
    """Fail at load time when the config's transaction policy, tensor names or dtypes differ from
    what the model code reads and writes (`inputs` / `outputs`: name -> "TYPE_..."; `dims`: name ->
    the dims the config must declare, -1 included)."""
    name = config.get("name", "?")
    actual = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
    if actual != decoupled:
        raise ModelConfigError(
            f"model {name!r} must {'' if decoupled else 'not '}use the decoupled transaction "
            f"policy (model_transaction_policy {{ decoupled: {str(decoupled).lower()} }})"
        )
    declared = {t["name"]: t for kind in ("input", "output") for t in config.get(kind, [])}
    for kind, wanted in (("input", inputs or {}), ("output", outputs or {})):
        names = {t["name"] for t in config.get(kind, [])}
        for tensor, dtype in wanted.items():
            if tensor not in names:
                raise ModelConfigError(f"model {name!r} has no {kind} {tensor!r}")
            if declared[tensor]["data_type"] != dtype:
                raise ModelConfigError(
                    f"model {name!r}: {kind} {tensor!r} must be {dtype}, "
                    f"the config says {declared[tensor]['data_type']}"
                )
    for tensor, want in (dims or {}).items():
        got = [int(d) for d in declared.get(tensor, {}).get("dims", [])]
        if got != list(want):
            raise ModelConfigError(
                f"model {name!r}: tensor {tensor!r} must have dims {list(want)}, the config says {got}"
            )
