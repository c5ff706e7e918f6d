"""Run a serialized TensorRT / TensorRT-RTX engine on torch CUDA tensors (needs a CUDA GPU).

Also the pieces the engine builder shares with it: importing the TensorRT flavour with an install
hint, the logger that keeps errors for the report, and the error type.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from mgm_ref.errors import MGMError

BACKENDS = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx"}


class EngineBuildError(MGMError, RuntimeError):
    """TensorRT is missing, the ONNX graph did not parse, the builder failed, or an engine did not load or run."""


class TensorRTUnavailable(EngineBuildError):
    """The requested TensorRT flavour is not importable here."""


def import_tensorrt(backend: str = "tensorrt"):
    """Import `tensorrt` or `tensorrt_rtx`, with an install hint when it is missing."""
    if backend not in BACKENDS:
        raise EngineBuildError(f"unknown TensorRT backend {backend!r}; expected one of {sorted(BACKENDS)}")
    try:
        return importlib.import_module(BACKENDS[backend])
    except ImportError as e:
        hint = (
            "full TensorRT comes with NVIDIA's containers (nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3) "
            "or `pip install tensorrt-cu12` from NVIDIA's index; to check that a graph parses and builds "
            "without a GPU use --backend tensorrt_rtx (pip install tensorrt-rtx-cu13)"
            if backend == "tensorrt"
            else "pip install tensorrt-rtx-cu13 (it builds engines without a GPU)"
        )
        raise TensorRTUnavailable(f"cannot import {BACKENDS[backend]} ({e}); {hint}") from e


def make_trt_logger(trt, verbose: bool, echo: Callable[[str], None]):
    class _Logger(trt.ILogger):
        """Prints warnings and errors (everything with verbose=True) and keeps errors for the report."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                echo(f"[TRT] ERROR: {msg}")
            elif severity == trt.ILogger.Severity.WARNING or verbose:
                echo(f"[TRT] {str(severity).rsplit('.', 1)[-1]}: {msg}")

    return _Logger()


class TrtRunner:
    """Deserialize an engine and run it on torch CUDA tensors (one optimization profile)."""

    def __init__(self, engine_path: str | Path, backend: str | None = None):
        import torch

        if not torch.cuda.is_available():
            raise EngineBuildError("running a TensorRT engine needs a CUDA GPU (torch.cuda.is_available() is False)")
        engine_path = Path(engine_path)
        if backend is None:
            cfg = engine_path.with_name("config.json")
            backend = json.loads(cfg.read_text()).get("backend", "tensorrt") if cfg.is_file() else "tensorrt"
        self.trt = trt = import_tensorrt(backend)
        self._logger = make_trt_logger(trt, False, lambda m: print(m, file=sys.stderr))
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"{engine_path}: could not deserialize: " + "; ".join(self._logger.errors))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._torch_dtype = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
            trt.DataType.BOOL: torch.bool,
        }

    def dtype(self, name: str):
        return self._torch_dtype[self.engine.get_tensor_dtype(name)]

    def run(self, feeds: dict, stream=None) -> dict:
        import torch

        stream = stream or torch.cuda.current_stream()
        keep = []
        for name in self.input_names:
            t = feeds[name].to(device="cuda", dtype=self.dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("execute_async_v3 failed: " + "; ".join(self._logger.errors))
        stream.synchronize()
        return outs

    def __call__(self, **feeds) -> dict:
        return self.run(feeds)
