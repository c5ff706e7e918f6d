"""The CPU artifact's precision modes: what `mgm-build vision --backend onnxruntime --precision P` writes.

- float32: the exported ONNX graph as is (ONNX Runtime).
- int8: the float32 graph with the MatMuls whose second operand is a weight quantised dynamically
  (onnxruntime.quantization.quantize_dynamic: int8 weights, per-call uint8 activations, run as
  VNNI integer GEMMs). Activation x activation products (attention, mining logits) stay float32.
- bfloat16: a torch.export program of the graph under CPU autocast (oneDNN bf16 GEMMs and
  convolutions on avx512_bf16; LayerNorm, softmax and reductions stay float32). ONNX Runtime's CPU
  provider has no bfloat16 MatMul and its float16 MatMul is no faster than float32, so bf16 runs in
  PyTorch. The program keeps float32 inputs and outputs, like the other modes.

Each mode's error against the float32 PyTorch reference is measured on fresh inputs by the caller
(vision.py) and gated by MAX_REL_L2.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from build_engines.onnx_export import EXTERNAL_DATA_THRESHOLD_BYTES, onnx_files
from mgm_runtime.torch_runner import PROGRAM_FILE, check_program_archive

PRECISIONS = ("float32", "bfloat16", "int8")
PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}
# Relative L2 vs the float32 PyTorch reference above which an artifact is refused.
# float32: export/runtime differences only. bfloat16: 8 mantissa bits on every GEMM input, the
# dtype's usual 1e-2. int8: per-tensor activations and weights (~2^-8 steps of each tensor's range)
# on every weight GEMM compound through ~50 layers; 5e-2 is an overall cosine to fp32 of ~0.9987
# (1 - e^2/2), met with a 2.4x margin by the towers with random weights (README, vision section).
MAX_REL_L2 = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-2, "int8": 5e-2}


def normalise_precision(name: str) -> str:
    """argparse `type=`: accepts fp32/bf16 for float32/bfloat16."""
    return PRECISION_ALIASES.get(name, name)


# ------------------------------------------------------------------------------------------------
# int8: ONNX Runtime dynamic quantisation
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_quantizer():
    """quantize_dynamic logs a pre-processing hint through the root logger on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32_onnx: str | Path, int8_onnx: str | Path) -> Path:
    """Dynamic int8 quantisation of every weight MatMul (int8 weights, uint8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_onnx, int8_onnx = Path(fp32_onnx), Path(int8_onnx)
    big = sum(f.stat().st_size for f in onnx_files(fp32_onnx)) > EXTERNAL_DATA_THRESHOLD_BYTES
    with _quiet_quantizer():
        quantize_dynamic(
            fp32_onnx,
            int8_onnx,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,  # s8 weights: the VNNI u8 x s8 kernel (~2x the u8 x u8 one)
            use_external_data_format=big,
            extra_options={"MatMulConstBOnly": True},
        )
    return int8_onnx


def count_quantized(onnx_path: str | Path) -> dict[str, int]:
    """{"MatMulInteger": n, "MatMul": m}: how many GEMMs went int8 and how many stayed float."""
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    return {op: sum(n.op_type == op for n in nodes) for op in ("MatMulInteger", "MatMul")}


# ------------------------------------------------------------------------------------------------
# bfloat16: a torch.export program under CPU autocast
# ------------------------------------------------------------------------------------------------
class Bfloat16Program(nn.Module):
    """`graph` under CPU bf16 autocast, float32 in and out (the artifact's I/O dtype in every mode)."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.body = graph  # not "graph": the unlifted program is a GraphModule, whose .graph is its fx graph

    def forward(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = self.body(images, images_aux)
        return features.float()


def gemm_weights_in_bfloat16(graph: nn.Module) -> nn.Module:
    """A copy of `graph` whose Linear and Conv2d parameters are bfloat16. Autocast casts exactly those
    to bf16 on every call anyway (same numbers), but that is ~1 GB of fresh casts per image at MGM-7B
    sizes, whose allocation made run times erratic (4 s to 16 s); LayerNorm and the other parameters
    stay float32 for autocast's float32 ops."""
    import copy

    graph = copy.deepcopy(graph)
    for module in graph.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(torch.bfloat16)
    return graph


def export_bfloat16_program(graph: nn.Module, dummy_inputs: tuple[torch.Tensor, ...], out_dir: str | Path) -> Path:
    """torch.export `graph` (float32 weights) under bf16 autocast with a dynamic batch into
    `out_dir/model.pt2`. The archive holds raw tensor bytes and a JSON program; no sample inputs."""
    from torch.export import Dim

    path = Path(out_dir) / PROGRAM_FILE
    batch = Dim("batch")
    with torch.no_grad():
        program = torch.export.export(
            Bfloat16Program(gemm_weights_in_bfloat16(graph)).eval(),
            tuple(dummy_inputs),
            dynamic_shapes=({0: batch}, {0: batch}),
        )
    # Sample inputs would be stored as a torch.save pickle: leave them out.
    program._example_inputs = None
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".model-", suffix=".pt2", delete=False) as tmp:
        scratch = Path(tmp.name)
    try:
        torch.export.save(program, scratch)
        check_program_archive(scratch)
        scratch.replace(path)
    finally:
        scratch.unlink(missing_ok=True)
    return path
