"""Model-agnostic ONNX export: one wrapper nn.Module in, one checked ONNX file out.

Nothing here knows about MGM. A caller hands over the module whose `forward` is the exact engine
boundary, dummy inputs of the real shapes, tensor names and dynamic axes; `export_onnx` exports,
re-saves (weights in one side file when the graph is too big for one protobuf), checks the result
with the ONNX checker and returns the path.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from mgm_ref.errors import MGMError

MIN_OPSET = 17
DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
# Protobuf cannot serialize a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


class OnnxExportError(MGMError, RuntimeError):
    """The export, or the check of the exported graph, failed."""


def _param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def export_onnx(
    module: torch.nn.Module,
    dummy_inputs: Sequence[torch.Tensor],
    onnx_path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Export `module(*dummy_inputs)` to `onnx_path` and return that path.

    - `dynamic_axes`: {tensor name: {axis: symbolic name}}, e.g. {"images": {0: "batch"}}.
    - `exporter`: "dynamo" (torch.export based, the default: no real forward is run, so fp16/bf16
      exports are fast on CPU; opset >= 18) or "torchscript" (torch.onnx.export(dynamo=False):
      traces one real forward in the export dtype; its bf16 Casts are wrong, see vision.py).
    - Weights go to `<name>.data` beside the graph when they exceed ~1.8 GB (protobuf's 2 GiB cap),
      so TensorRT's parser and ONNX Runtime find them relative to the graph file.
    """
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset {opset} is too old: the vision graphs need opset >= {MIN_OPSET}")
    if exporter not in EXPORTERS:
        raise OnnxExportError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    if len(dummy_inputs) != len(input_names):
        raise OnnxExportError(f"{len(dummy_inputs)} dummy inputs for {len(input_names)} input names")
    unknown = set(dynamic_axes) - set(input_names) - set(output_names)
    if unknown:
        raise OnnxExportError(f"dynamic_axes names unknown tensors: {sorted(unknown)}")

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    # Export into a scratch folder beside the target: exporters may scatter one file per
    # initializer for big models; the final save below writes one graph + at most one data file.
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=onnx_path.parent) as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings(), _quiet_logger("torch.onnx._internal.exporter._registration"):
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            args = tuple(dummy_inputs)
            try:
                if exporter == "torchscript":
                    torch.onnx.export(
                        module,
                        args,
                        str(raw_path),
                        input_names=list(input_names),
                        output_names=list(output_names),
                        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                        opset_version=opset,
                        do_constant_folding=True,
                        dynamo=False,
                    )
                else:
                    program = torch.onnx.export(
                        module,
                        args,
                        input_names=list(input_names),
                        output_names=list(output_names),
                        dynamic_shapes=_dynamic_shapes(input_names, dynamic_axes),
                        opset_version=max(opset, 18),
                        dynamo=True,
                        optimize=True,
                        verbose=False,
                    )
                    program.save(str(raw_path), external_data=True)
            except Exception as e:  # surface the exporter's message with context
                raise OnnxExportError(f"ONNX export ({exporter}, opset {opset}) failed: {type(e).__name__}: {e}") from e
        say(f"exported the graph with the {exporter} exporter in {time.perf_counter() - t0:.1f}s; checking it")
        _finalize(raw_path, onnx_path, big=_param_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES)
    return onnx_path


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence one logger (the dynamo exporter warns about every missing torchvision op)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dynamic_shapes(input_names, dynamic_axes):
    """dynamic_axes ({name: {axis: symbol}}) -> torch.export dynamic_shapes; a symbol shared by
    several inputs (e.g. "batch") becomes one Dim, so the exporter knows those sizes are equal."""
    from torch.export import Dim

    dims: dict[str, object] = {}
    return tuple(
        {int(axis): dims.setdefault(sym, Dim(sym)) for axis, sym in dynamic_axes.get(name, {}).items()} or None
        for name in input_names
    )


def _finalize(raw_path: Path, onnx_path: Path, big: bool) -> None:
    import onnx

    from build_engines.onnx_passes import reorder_exact_gelu

    model = onnx.load(str(raw_path), load_external_data=True)
    reorder_exact_gelu(model.graph)
    data_name = onnx_path.name + ".data"
    for stale in (onnx_path, onnx_path.with_name(data_name)):
        if stale.exists():
            stale.unlink()
    if big:
        onnx.save_model(
            model,
            str(onnx_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(onnx_path))
    try:
        onnx.checker.check_model(str(onnx_path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"{onnx_path}: the exported graph fails the ONNX checker: {e}") from e


def onnx_files(onnx_path: str | Path) -> list[Path]:
    """The graph file and its external-data file, if any."""
    onnx_path = Path(onnx_path)
    data = onnx_path.with_name(onnx_path.name + ".data")
    return [onnx_path] + ([data] if data.exists() else [])


_ONNX_DTYPE_NAMES = {
    1: "float32",
    10: "float16",
    16: "bfloat16",
    11: "float64",
    7: "int64",
    6: "int32",
    9: "bool",
    2: "uint8",
    3: "int8",
}


def describe_io(onnx_path: str | Path) -> dict:
    """{"inputs": [{name, dtype, shape}], "outputs": [...]} read from the graph (symbolic dims -> -1)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {
            "name": v.name,
            "dtype": _ONNX_DTYPE_NAMES.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type).lower()),
            "shape": dims,
        }

    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [one(v) for v in model.graph.input if v.name not in inits],
        "outputs": [one(v) for v in model.graph.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }
