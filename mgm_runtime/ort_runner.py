"""Run an exported graph with ONNX Runtime (the CPU artifact's runtime, and the parity oracle for engines)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtRunner:
    """One ONNX Runtime session over a graph; inputs are cast to the graph's declared dtypes.

    `threads`: intra-op threads (default: ORT's choice, i.e. all cores). `providers`: ORT execution
    providers, CPU by default.
    """

    def __init__(self, onnx_path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"{self.onnx_path}: no such ONNX graph")
        self.session = ort.InferenceSession(
            str(self.onnx_path), sess_options=session_options(threads), providers=providers or ["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_dtypes = {n: _ORT_TO_NUMPY.get(i.type) for n, i in self.inputs.items()}
        for name, dtype in self.input_dtypes.items():
            if dtype is None:
                raise TypeError(
                    f"{self.onnx_path}: input {name} has type {self.inputs[name].type}, which this runner does not feed"
                )

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        extra = set(feeds) - set(self.inputs)
        if missing or extra:
            raise KeyError(
                f"inputs expected {sorted(self.inputs)}; missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        arrays = {}
        for name, value in feeds.items():
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu()
                if str(value.dtype) == "torch.bfloat16":
                    value = value.float()
                value = value.numpy()
            arrays[name] = np.ascontiguousarray(value, dtype=self.input_dtypes[name])
        outs = self.session.run(self.output_names, arrays)
        return dict(zip(self.output_names, outs, strict=True))

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        return self.run(feeds)


def session_options(threads: int | None = None):
    """The runner's ONNX Runtime session options (also what the benchmark profiles with).

    Memory patterns are off: with them, ORT plans one block per input shape on the first run and
    first touches it on the second, so each new batch size paid two runs of page faults (1.5 s of
    4 s at MGM-7B vision sizes) and kept a block per shape. Without them the arena's chunks from
    the first run are reused by every later one.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_mem_pattern = False
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def default_threads() -> int:
    """Cores this process may use (respects taskset/cgroup affinity where the OS exposes it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
