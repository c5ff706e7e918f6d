"""A small in-process stand-in for `triton_python_backend_utils`, to run each model.py without a server.

`install(monkeypatch)` puts the fake module into sys.modules; `load_model(name)` imports
triton_models/templates/<name>/1/model.py against it; `model_config(name, **values)` parses that
model's config.pbtxt template (filled with `values`) into the JSON Triton hands to `initialize`.
BLS calls (`InferenceRequest(...).async_exec()`) go to the fakes registered in `downstream`.
Custom metrics (`MetricFamily`) land in `metric_families`, merged by name as Triton's registry does.
"""

from __future__ import annotations

import importlib.util
import json
import string
import sys
import types
import weakref
from pathlib import Path

import numpy as np

TEMPLATES = Path(__file__).resolve().parents[1] / "triton_models" / "templates"
FINAL = 1

_DTYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_UINT64": np.uint64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_STRING": np.object_,
}


class TritonError:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self.output_tensors, self.error_ = list(output_tensors), error

    def has_error(self) -> bool:
        return self.error_ is not None

    def error(self) -> TritonError | None:
        return self.error_

    def output(self, name: str) -> np.ndarray | None:
        """Test convenience: an output as numpy (None when absent)."""
        t = get_output_tensor_by_name(self, name)
        return None if t is None else t.as_numpy()


class ResponseSender:
    def __init__(self):
        self.sent: list[tuple[InferenceResponse | None, int]] = []

    def send(self, response=None, flags: int = 0) -> None:
        if self.sent and self.sent[-1][1] & FINAL:
            raise AssertionError("a response was sent after the final one")
        self.sent.append((response, flags))

    @property
    def finished(self) -> bool:
        return bool(self.sent) and bool(self.sent[-1][1] & FINAL)

    def responses(self) -> list[InferenceResponse]:
        return [r for r, _ in self.sent if r is not None]


class Request:
    """A client request: named numpy inputs (the batch dim included), a sender, a cancel flag."""

    def __init__(self, inputs: dict[str, np.ndarray], request_id: str = "r"):
        self._inputs = {k: Tensor(k, v) for k, v in inputs.items() if v is not None}
        self._id = request_id
        self.sender = ResponseSender()
        self.cancelled = False

    def inputs(self):
        return list(self._inputs.values())

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        # Triton releases the request with its final response; asking afterwards crashed tritonserver
        # (TRITONBACKEND_ResponseFactoryIsCancelled on a freed factory)
        if self.sender.finished:
            raise AssertionError("is_cancelled() after the final response: tritonserver would crash")
        return self.cancelled

    def request_id(self) -> str:
        return self._id


# model name -> callable(inputs: dict[str, np.ndarray]) -> InferenceResponse | iterator of them (decoupled)
downstream: dict = {}
bls_calls: list[tuple[str, dict]] = []


class InferenceRequest:
    def __init__(self, model_name: str, inputs, requested_output_names=(), request_id: str = "", **_):
        self.model_name, self.request_id = model_name, request_id
        self.inputs = {t.name(): t.as_numpy() for t in inputs}

    def _call(self):
        inputs = {**self.inputs, "request_id": self.request_id}
        bls_calls.append((self.model_name, inputs))
        return downstream[self.model_name](inputs)

    def exec(self, decoupled: bool = False):
        out = self._call()
        return iter(out) if decoupled else out

    async def async_exec(self, decoupled: bool = False):
        return self.exec(decoupled)


class Metric:
    """One labelled series. Like the real one: a counter only goes up, only a gauge can be set, and
    the family must outlive its metrics (the metric does not keep it alive)."""

    def __init__(self, family: MetricFamily, labels: dict[str, str]):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise TypeError("metric labels must be strings")  # Triton refuses other parameter types
        self._family, self.labels, self._value = weakref.ref(family), dict(labels), 0.0

    def family(self) -> MetricFamily:
        family = self._family()
        if family is None:
            raise RuntimeError(
                "Failed to set metric value: Invalid metric operation as the corresponding 'MetricFamily' has been deleted"
            )
        return family

    def increment(self, value: float) -> None:
        if self.family().kind == MetricFamily.COUNTER and value < 0:
            raise ValueError("a counter cannot go down")
        self._value += value

    def set(self, value: float) -> None:
        if self.family().kind != MetricFamily.GAUGE:
            raise ValueError("only a gauge can be set")
        self._value = float(value)

    def value(self) -> float:
        return self._value


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __init__(self, name: str, description: str, kind: int):
        old = metric_families.get(name)
        if old is not None and (old.description, old.kind) != (description, kind):
            raise ValueError(f"metric family {name!r} exists with another description or kind")
        self.name, self.description, self.kind = name, description, kind
        self.series = old.series if old is not None else {}
        metric_families[name] = self

    def Metric(self, labels: dict[str, str] | None = None) -> Metric:
        key = tuple(sorted((labels or {}).items()))
        return self.series.setdefault(key, Metric(self, labels or {}))

    def value(self, labels: dict[str, str]) -> float:
        """Test convenience: the value of one label set (0 when never touched)."""
        series = self.series.get(tuple(sorted(labels.items())))
        return series.value() if series else 0.0


# metric name -> the live family of that name, as the server would list them on its metrics port
metric_families: weakref.WeakValueDictionary[str, MetricFamily] = weakref.WeakValueDictionary()


def metric_value(name: str, **labels) -> float:
    """Test convenience: the value of one series (0 when it was never created)."""
    family = metric_families.get(name)
    series = family.series.get(tuple(sorted(labels.items()))) if family else None
    return series.value() if series else 0.0


def get_input_tensor_by_name(request: Request, name: str):
    return request._inputs.get(name)


def get_output_tensor_by_name(response: InferenceResponse, name: str):
    return next((t for t in response.output_tensors if t.name() == name), None)


def get_output_config_by_name(config: dict, name: str):
    return next((o for o in config.get("output", []) if o["name"] == name), None)


def get_input_config_by_name(config: dict, name: str):
    return next((o for o in config.get("input", []) if o["name"] == name), None)


def triton_string_to_numpy(dtype: str):
    return _DTYPES[dtype]


def using_decoupled_model_transaction_policy(config: dict) -> bool:
    return bool(config.get("model_transaction_policy", {}).get("decoupled", False))


def _module() -> types.ModuleType:
    mod = types.ModuleType("triton_python_backend_utils")
    for name, value in globals().items():
        if not name.startswith("_") and name not in ("install", "load_model", "model_config", "annotations"):
            setattr(mod, name, value)
    mod.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    return mod


def install(monkeypatch) -> types.ModuleType:
    downstream.clear()
    bls_calls.clear()
    metric_families.clear()
    mod = _module()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mod)
    return mod


def load_model(name: str) -> types.ModuleType:
    """templates/<name>/1/model.py as a module (call `install` first)."""
    path = TEMPLATES / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config(name: str, **values) -> dict:
    """templates/<name>/config.pbtxt with ${...} filled from `values`, as Triton's JSON model config."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    text = string.Template((TEMPLATES / name / "config.pbtxt").read_text()).substitute(values)
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def args_for(config: dict) -> dict:
    return {
        "model_config": json.dumps(config),
        "model_name": config["name"],
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
    }
