"""`mgm-build vision`: MGM's vision side (CLIP + ConvNeXt + patch info mining + projector) as ONE
graph -> ONNX -> TensorRT engine (or the ONNX Runtime CPU artifact), with a parity check per step.
The stage reads top to bottom (options, export, ONNX parity, build, engine parity, CLI); the graph itself
is in vision_graph.py, export and FLOP counting in onnx_export.py / onnx_flops.py, the CPU artifact's
reduced-precision files in vision_cpu.py.
Over 400 lines: one build stage with its checks and CLI; the parts that do not need this module's spec
and errors live in the modules above.

    mgm-build vision --model_dir DIR --output_dir OUT [--dtype float16|bfloat16|float32]
                     [--max_batch_size N] [--backend tensorrt|tensorrt_rtx|onnxruntime]
                     [--precision float32|bfloat16|int8] [--max_rel_l2 X]

Engine boundary = `mgm_ref.vision.MGMVisionEncoder.forward(images, images_aux)`:
  images      (B, 3, 336, 336)        normal  |  (B, 5, 3, 336, 336) HD (TL, TR, BL, BR crops, global)
  images_aux  (B, 3, S, S)            S = 768 normal, 1536 HD
  image_features (B, T, H)            T = 576 normal, 2880 HD; H = the LLM hidden size
Artifact folder (TensorRT-LLM multimodal_builder layout): `model.engine` or `model.onnx` + `config.json`;
the CPU artifact's bfloat16 mode writes `model.pt2` (a torch.export program, vision_cpu.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from build_engines.onnx_export import DEFAULT_OPSET, EXPORTERS, describe_io, export_onnx, onnx_files
from build_engines.trt_engine import (
    EngineBuildError,
    InputProfile,
    TensorRTUnavailable,
    batch_profile,
    build_engine,
    import_tensorrt,
)
from build_engines.vision_cpu import (
    MAX_REL_L2,
    PRECISIONS,
    count_quantized,
    export_bfloat16_program,
    normalise_precision,
    quantize_int8,
)
from build_engines.vision_graph import MGMVisionGraph
from mgm_ref.errors import CheckpointError, MGMError
from mgm_runtime.numerics import rel_l2  # noqa: F401  (tests import it from here)
from mgm_runtime.torch_runner import PROGRAM_FILE
from mgm_runtime.vision_artifact import CONFIG_FILE, MODEL_TYPE

INPUT_NAMES = ("images", "images_aux")
OUTPUT_NAME = "image_features"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("tensorrt", "tensorrt_rtx", "onnxruntime")
ENGINE_FILE, ONNX_FILE = "model.engine", "model.onnx"
# relative L2 of the artifact vs the float32 PyTorch reference above which a build is refused
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-1}
PARITY_SEED = 1234  # the parity inputs' seed: not the export's dummy inputs (seed 0)
PARITY_INPUTS = {"inputs": f"fresh N(0, 1) pixels, batch 1, seed {PARITY_SEED}"}


class VisionBuildError(MGMError):
    """A vision build cannot proceed: bad option, unwritable output, failed export/parse/parity."""


# ------------------------------------------------------------------------------------------------
# The exported graph (build_engines.vision_graph) and one spec describing its I/O.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionGraphSpec:
    """Per-image shapes of the graph's inputs and output, derived from an MGMConfig."""

    images_shape: tuple[int, ...]  # (3, 336, 336) or (5, 3, 336, 336)
    images_aux_shape: tuple[int, ...]  # (3, S, S)
    tokens_per_image: int
    hidden_size: int
    hd: bool

    @classmethod
    def from_config(cls, cfg) -> VisionGraphSpec:
        lr = (3, cfg.lr_size, cfg.lr_size)
        images = (cfg.views_per_image, *lr) if cfg.hd else lr
        return cls(images, (3, cfg.image_size_aux, cfg.image_size_aux), cfg.tokens_per_image, cfg.hidden_size, cfg.hd)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"images": self.images_shape, "images_aux": self.images_aux_shape}

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.tokens_per_image, self.hidden_size)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}

    def dummy_inputs(self, batch: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random normalised-pixel-like inputs (what the processor emits: roughly N(0, 1))."""
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn((batch, *self.input_shapes[n]), generator=g).to(dtype) for n in INPUT_NAMES)

    def profiles(self, max_batch_size: int) -> list[InputProfile]:
        lo, opt, hi = batch_profile(max_batch_size)
        return [InputProfile(n, (lo, *s), (opt, *s), (hi, *s)) for n, s in self.input_shapes.items()]


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def _logger(quiet: bool = False) -> Callable[[str], None]:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[mgm-build vision {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    return log


def check_options(dtype: str, backend: str, max_batch_size: int, precision: str | None = None) -> None:
    if precision is not None:
        if precision not in PRECISIONS:
            raise VisionBuildError(f"--precision {precision!r} is not supported; choose one of {list(PRECISIONS)}")
        if backend != "onnxruntime":
            raise VisionBuildError(
                f"--precision is for the CPU artifact (--backend onnxruntime); a {backend} engine's precision "
                "is its --dtype"
            )
        if dtype != "float32":
            raise VisionBuildError(
                f"--precision {precision} starts from the float32 graph; drop --dtype {dtype} (or use float32)"
            )
    if dtype not in DTYPES:
        raise VisionBuildError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if backend not in BACKENDS:
        raise VisionBuildError(f"--backend {backend!r} is not supported; choose one of {list(BACKENDS)}")
    if backend == "onnxruntime" and dtype == "bfloat16":
        raise VisionBuildError(
            "--dtype bfloat16 cannot be served by ONNX Runtime on CPU (no bfloat16 Conv/MatMul kernels); "
            "use --precision bfloat16 (the graph in PyTorch under bf16 autocast), or --dtype float32 "
            "(recommended on CPU) or float16 for --backend onnxruntime"
        )
    if int(max_batch_size) < 1:
        raise VisionBuildError(f"--max_batch_size must be >= 1, got {max_batch_size}")


def check_writable(output_dir: str | Path) -> Path:
    """Create `output_dir` if needed and prove a file can be written there, before any long step."""
    out = Path(output_dir)
    try:
        if out.exists() and not out.is_dir():
            raise VisionBuildError(f"--output_dir {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise VisionBuildError(f"--output_dir {out} is not writable: {e.strerror or e}") from None
    return out


def export_vision_onnx(
    encoder: nn.Module,
    cfg,
    onnx_path: str | Path,
    dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    export_batch: int = 2,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Export `encoder` (already in `dtype`) as the one-graph vision model with a dynamic batch."""
    spec = VisionGraphSpec.from_config(cfg)
    graph = MGMVisionGraph(encoder).eval()
    dummy = spec.dummy_inputs(export_batch, DTYPES[dtype])
    return export_onnx(
        graph, dummy, onnx_path, INPUT_NAMES, [OUTPUT_NAME], spec.dynamic_axes, opset=opset, exporter=exporter, log=log
    )


def artifact_config(
    cfg,
    spec: VisionGraphSpec,
    dtype: str,
    backend: str,
    max_batch_size: int,
    file: str,
    io: dict,
    extra: dict | None = None,
    precision: str | None = None,
    runtime: str | None = None,
) -> dict:
    """The sidecar config.json: everything a server needs to feed the artifact without reading it."""
    lo, opt, hi = batch_profile(max_batch_size)
    per_image = spec.input_shapes
    inputs = [
        {
            "name": t["name"],
            "dtype": t["dtype"],
            "shape": [-1, *per_image[t["name"]]],
            "per_image_shape": list(per_image[t["name"]]),
        }
        for t in io["inputs"]
    ]
    out_dtype = io["outputs"][0]["dtype"]
    precision = precision or dtype
    config = {
        "model_type": MODEL_TYPE,
        "backend": backend,
        "file": file,
        # what runs `file` (the CPU artifact: onnxruntime, or torch for the bfloat16 program)
        "runtime": runtime or backend,
        "dtype": dtype,  # of the inputs and outputs
        "precision": precision,  # of the arithmetic: dtype, or a CPU precision mode
        "max_batch_size": hi,
        "profile": {"min": lo, "opt": opt, "max": hi},
        "inputs": inputs,
        "outputs": [{"name": OUTPUT_NAME, "dtype": out_dtype, "shape": [-1, *spec.output_shape]}],
        "output_shape": [-1, *spec.output_shape],
        "tokens_per_image": spec.tokens_per_image,
        "hidden_size": spec.hidden_size,
        "hd": spec.hd,
        "views_per_image": cfg.views_per_image,
        "image_size": cfg.lr_size,
        "image_size_aux": cfg.image_size_aux,
        "family": cfg.family,
        "onnx_opset": io.get("opset"),
        # what TensorRT-LLM's multimodal runner reads from a vision engine's config.json
        "builder_config": {
            "model_type": MODEL_TYPE,
            "precision": precision,
            "max_batch_size": hi,
            "strongly_typed": backend != "onnxruntime",
            "output_shape": [-1, *spec.output_shape],
        },
    }
    config.update(extra or {})
    return config


def verify_onnx(
    onnx_path: Path,
    reference: nn.Module,
    spec: VisionGraphSpec,
    dtype: str,
    batch: int = 1,
    seed: int = 1234,
    threads: int | None = None,
) -> float:
    """rel L2 of ONNX Runtime on the graph vs the float32 PyTorch reference, on fresh random inputs."""
    from mgm_runtime.ort_runner import OrtRunner

    return verify_runner(OrtRunner(onnx_path, threads=threads), reference, spec, batch, seed)


def verify_runner(runner, reference: nn.Module, spec: VisionGraphSpec, batch: int = 1, seed: int = 1234) -> float:
    """rel L2 of `runner(images=, images_aux=)` vs the float32 PyTorch reference, on fresh random inputs."""
    images, images_aux = spec.dummy_inputs(batch, torch.float32, seed)
    with torch.no_grad():
        want = reference(images, images_aux)
    got = runner(images=images.numpy(), images_aux=images_aux.numpy())[OUTPUT_NAME]
    return rel_l2(got, want)


def verify_engine(
    engine_path: Path, reference: nn.Module, spec: VisionGraphSpec, backend: str, batch: int = 1, seed: int = 1234
) -> float:
    """rel L2 of the engine (GPU) vs the float32 PyTorch reference (on the GPU too)."""
    from mgm_runtime.trt_runner import TrtRunner

    runner = TrtRunner(engine_path, backend=backend)
    images, images_aux = spec.dummy_inputs(batch, torch.float32, seed)
    ref = copy.deepcopy(reference).cuda()
    with torch.no_grad():
        want = ref(images.cuda(), images_aux.cuda())
    got = runner(images=images, images_aux=images_aux)[OUTPUT_NAME]
    return rel_l2(got, want)


# GPUs TensorRT-RTX engines run on (its support matrix): Turing, Ampere GA10x, Ada, Blackwell consumer.
TENSORRT_RTX_SMS = ("SM75", "SM86", "SM89", "SM120", "SM121")


def engine_cannot_run_here(backend: str, compute_capabilities: list[str] | None = None) -> str | None:
    """Why this host cannot run the engine it just built (no GPU, a GPU the engine was not built for,
    no TensorRT runtime), or None when it can: then a failing run is a real failure."""
    if not torch.cuda.is_available():
        return "running an engine needs a CUDA GPU (this host has none)"
    major, minor = torch.cuda.get_device_capability()
    sm = f"SM{major}{minor}"
    targets = [c.upper() for c in compute_capabilities or []]
    if backend == "tensorrt_rtx" and (sm not in (targets or TENSORRT_RTX_SMS)):
        return f"this GPU is {sm}; the TensorRT-RTX engine targets {', '.join(targets or TENSORRT_RTX_SMS)}"
    try:
        import_tensorrt(backend)
    except TensorRTUnavailable as e:
        return f"no TensorRT runtime here ({e})"
    return None


def build_vision(
    encoder: nn.Module,
    cfg,
    output_dir: str | Path,
    dtype: str = "float16",
    max_batch_size: int = 4,
    backend: str = "tensorrt",
    timing_cache: str | Path | None = None,
    keep_onnx: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    verify: bool = True,
    compute_capabilities: list[str] | None = None,
    workspace_gb: float | None = None,
    log: Callable[[str], None] | None = None,
    source: dict | None = None,
    precision: str | None = None,
    max_rel_l2: float | None = None,
) -> dict:
    """Export a float32 `encoder` in `dtype`, verify, build for `backend`, write the artifact folder.
    `precision` (CPU artifact only): float32, or the bfloat16 / int8 modes (build_cpu_precision).
    `max_rel_l2` replaces the default limit of the parity check (VERIFY_TOLERANCE / MAX_REL_L2).

    Returns the artifact's config dict (also written to `output_dir/config.json`).
    """
    log = log or _logger()
    check_options(dtype, backend, max_batch_size, precision)
    if precision in ("bfloat16", "int8"):
        return build_cpu_precision(
            encoder,
            cfg,
            output_dir,
            precision,
            max_batch_size,
            keep_onnx,
            opset,
            exporter,
            verify,
            log,
            source,
            max_rel_l2,
        )
    out = check_writable(output_dir)
    trt = import_tensorrt(backend) if backend != "onnxruntime" else None  # fail before the long steps
    spec = VisionGraphSpec.from_config(cfg)
    reference = encoder.float().eval()
    target = reference if dtype == "float32" else copy.deepcopy(reference).to(DTYPES[dtype]).eval()

    onnx_dir = out if backend == "onnxruntime" else out / "onnx"
    onnx_path = onnx_dir / ONNX_FILE
    log(
        f"step 1/3: exporting the vision graph to ONNX ({dtype}, {'HD' if spec.hd else 'normal'}: "
        f"images {list(spec.images_shape)}, images_aux {list(spec.images_aux_shape)} -> "
        f"{list(spec.output_shape)} per image; full-size models take minutes)"
    )
    export_vision_onnx(target, cfg, onnx_path, dtype, opset=opset, exporter=exporter, log=log)
    io = describe_io(onnx_path)
    del target

    extra: dict = {"exporter": exporter, "source": source or {}}
    if verify and dtype != "bfloat16":
        log("step 2/3: checking the ONNX graph with ONNX Runtime against PyTorch float32 (batch 1)")
        err = verify_onnx(onnx_path, reference, spec, dtype)
        limit = VERIFY_TOLERANCE[dtype] if max_rel_l2 is None else max_rel_l2
        extra["parity"] = {"onnxruntime_vs_pytorch_fp32_rel_l2": err, "max_rel_l2": limit, **PARITY_INPUTS}
        log(f"ONNX Runtime vs PyTorch float32: relative L2 {err:.2e} (limit {limit:.0e})")
        if not err <= limit:
            raise VisionBuildError(
                f"the exported {dtype} graph does not match PyTorch: relative L2 {err:.3e} > "
                f"{limit:.0e} ({onnx_path} kept for inspection)"
            )
    else:
        log(
            "step 2/3: ONNX Runtime check skipped ("
            + (
                "--no_verify"
                if not verify
                else "ONNX Runtime has no bfloat16 CPU kernels; the engine is checked on a GPU instead"
            )
            + ")"
        )

    if backend == "onnxruntime":
        file = ONNX_FILE
        extra["files"] = [p.name for p in onnx_files(onnx_path)]
        log(f"step 3/3: ONNX Runtime artifact ready: {onnx_path}")
    else:
        file = ENGINE_FILE
        if timing_cache is None and backend == "tensorrt":
            timing_cache = out / "timing.cache"
        log(
            f"step 3/3: building a strongly typed {backend} engine (batch min/opt/max "
            f"{'/'.join(map(str, batch_profile(max_batch_size)))})"
        )
        try:
            result = build_engine(
                onnx_path,
                out / ENGINE_FILE,
                spec.profiles(max_batch_size),
                backend=backend,
                timing_cache=timing_cache,
                compute_capabilities=compute_capabilities,
                workspace_bytes=int(workspace_gb * 2**30) if workspace_gb else None,
                log=log,
            )
        except EngineBuildError as e:
            raise VisionBuildError(f"{e}\n(the ONNX graph is kept at {onnx_path})") from e
        extra.update(
            {
                "library": {"name": trt.__name__, "version": trt.__version__},
                "build_seconds": round(result.build_seconds, 1),
                "files": [ENGINE_FILE],
            }
        )
        if keep_onnx:
            extra["onnx"] = str(onnx_path.relative_to(out))
        reason = "--no_verify" if not verify else engine_cannot_run_here(backend, compute_capabilities)
        if reason is None:
            try:
                err = verify_engine(out / ENGINE_FILE, reference, spec, backend)
            except Exception as e:
                raise VisionBuildError(
                    f"the {backend} engine was built but running it on this GPU failed: "
                    f"{type(e).__name__}: {e} ({out / ENGINE_FILE} kept for inspection)"
                ) from e
            extra.setdefault("parity", {})[f"{backend}_vs_pytorch_fp32_rel_l2"] = err
            limit = VERIFY_TOLERANCE[dtype] if max_rel_l2 is None else max_rel_l2
            log(f"engine vs PyTorch float32 on the GPU: relative L2 {err:.2e} (limit {limit:.0e})")
            if not err <= limit:
                raise VisionBuildError(
                    f"the {dtype} {backend} engine does not match PyTorch: relative L2 {err:.3e} > "
                    f"{limit:.0e} ({out / ENGINE_FILE} kept for inspection)"
                )
        else:
            log(f"engine run check skipped: {reason}; the engine was built, not run")

    config = artifact_config(cfg, spec, dtype, backend, max_batch_size, file, io, extra, precision=dtype)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if backend != "onnxruntime" and not keep_onnx:
        for f in onnx_files(onnx_path):
            f.unlink()
        try:
            onnx_dir.rmdir()
        except OSError:
            pass
    log(f"done: {out / file} + {out / CONFIG_FILE}")
    return config


def build_cpu_precision(
    encoder: nn.Module,
    cfg,
    output_dir: str | Path,
    precision: str,
    max_batch_size: int = 4,
    keep_onnx: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    verify: bool = True,
    log: Callable[[str], None] | None = None,
    source: dict | None = None,
    max_rel_l2: float | None = None,
) -> dict:
    """The CPU artifact in a reduced precision (vision_cpu.py): int8 (ONNX Runtime, the float32 graph
    with its weight MatMuls quantised) or bfloat16 (a torch.export program under CPU autocast).
    The error against float32 PyTorch is always measured (it is the point of the mode), written
    into config.json and gated: above the limit the build is refused and no config.json is written."""
    from mgm_runtime.ort_runner import OrtRunner
    from mgm_runtime.torch_runner import TorchProgramRunner

    log = log or _logger()
    if not verify:
        raise VisionBuildError(f"--precision {precision} is always checked against float32: drop --no_verify")
    out = check_writable(output_dir)
    spec = VisionGraphSpec.from_config(cfg)
    reference = encoder.float().eval()
    limit = MAX_REL_L2[precision] if max_rel_l2 is None else max_rel_l2
    extra: dict = {"source": source or {}}
    for stale in (out / CONFIG_FILE, out / ONNX_FILE, out / PROGRAM_FILE):
        stale.unlink(missing_ok=True)  # a refused build must not leave an older artifact loadable

    if precision == "bfloat16":
        log("step 1/3: exporting the vision graph as a torch.export program under CPU bfloat16 autocast")
        file, runtime = PROGRAM_FILE, "torch"
        export_bfloat16_program(MGMVisionGraph(reference).eval(), spec.dummy_inputs(2), out)
        extra.update(exporter="torch.export", files=[PROGRAM_FILE])
        io = {
            "inputs": [{"name": n, "dtype": "float32"} for n in INPUT_NAMES],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32"}],
        }
        runner = TorchProgramRunner(out / PROGRAM_FILE)
    else:
        file, runtime = ONNX_FILE, "onnxruntime"
        fp32_dir = out / "onnx"
        log(f"step 1/3: exporting the float32 vision graph to ONNX ({exporter}), then quantising its weight MatMuls")
        fp32_path = export_vision_onnx(reference, cfg, fp32_dir / ONNX_FILE, opset=opset, exporter=exporter, log=log)
        quantize_int8(fp32_path, out / ONNX_FILE)
        if not keep_onnx:
            for f in onnx_files(fp32_path):
                f.unlink()
            fp32_dir.rmdir()
        io = describe_io(out / ONNX_FILE)
        extra.update(
            exporter=exporter,
            files=[p.name for p in onnx_files(out / ONNX_FILE)],
            quantized=count_quantized(out / ONNX_FILE),
        )
        if keep_onnx:
            extra["onnx_float32"] = str(fp32_path.relative_to(out))
        runner = OrtRunner(out / ONNX_FILE)

    log(f"step 2/3: measuring the {precision} artifact against PyTorch float32 on fresh inputs (batch 1)")
    err = verify_runner(runner, reference, spec, seed=PARITY_SEED)
    del runner
    log(f"{precision} vs PyTorch float32: relative L2 {err:.2e} (limit {limit:.0e})")
    if not err <= limit:
        raise VisionBuildError(
            f"--precision {precision} is refused: its output differs from float32 by relative L2 {err:.3e}, above "
            f"the limit {limit:.0e}; use --precision float32 (or raise the limit with --max_rel_l2). "
            f"{out / file} kept for inspection; no config.json written"
        )
    extra["parity"] = {"rel_l2_vs_pytorch_fp32": err, "max_rel_l2": limit, **PARITY_INPUTS}
    config = artifact_config(
        cfg, spec, "float32", "onnxruntime", max_batch_size, file, io, extra, precision=precision, runtime=runtime
    )
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    log(f"step 3/3: done: {out / file} + {out / CONFIG_FILE}")
    return config


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def add_vision_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_dir", required=True, help="local MGM checkpoint folder (config.json + safetensors)")
    parser.add_argument("--output_dir", required=True, help="artifact folder: model.engine|model.onnx + config.json")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="precision of the exported graph, hence of the engine "
        "(default: float16 for TensorRT, float32 for onnxruntime)",
    )
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=4,
        help="images per engine call; profile min 1 / opt max//2 / max (default 4)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="tensorrt",
        help="tensorrt: engine for GPU hosts; tensorrt_rtx: same build with TensorRT-RTX "
        "(builds without a GPU; CI's parse+build check); onnxruntime: the CPU artifact",
    )
    parser.add_argument(
        "--timing_cache",
        default=None,
        help="TensorRT timing cache file, read and updated (default: OUTPUT_DIR/timing.cache)",
    )
    parser.add_argument("--keep_onnx", action="store_true", help="keep OUTPUT_DIR/onnx/model.onnx beside the engine")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, >= 17 (dynamo uses >= 18)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch.onnx exporter")
    parser.add_argument(
        "--compute_capability",
        action="append",
        default=None,
        metavar="SMxx",
        help="TensorRT-RTX target GPU architecture(s), e.g. SM86 (repeatable)",
    )
    parser.add_argument("--workspace_gb", type=float, default=None, help="TensorRT builder workspace limit")
    parser.add_argument(
        "--precision",
        type=normalise_precision,
        choices=PRECISIONS,
        default=None,
        help="CPU artifact (--backend onnxruntime) arithmetic: float32 (fp32, the default), bfloat16 (bf16: "
        "PyTorch/oneDNN on avx512_bf16) or int8 (ONNX Runtime dynamic quantisation, VNNI); measured against "
        "float32 at build time, refused above its limit",
    )
    parser.add_argument(
        "--max_rel_l2",
        type=float,
        default=None,
        help="refuse the artifact above this relative L2 vs PyTorch float32 (default: 1e-4 float32, "
        "5e-2 float16, 1e-2 bfloat16, 5e-2 int8; 1e-1 for a bfloat16 TensorRT engine)",
    )
    parser.add_argument("--no_verify", action="store_true", help="skip the parity checks against PyTorch")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run_vision_build(args: argparse.Namespace) -> dict:
    """Entry point behind `mgm-build vision`. Raises MGMError subclasses with actionable messages."""
    from mgm_ref.config import MGMConfig
    from mgm_ref.loader import load_vision

    log = _logger(args.quiet)
    dtype = args.dtype or ("float32" if args.backend == "onnxruntime" else "float16")
    check_options(dtype, args.backend, args.max_batch_size, args.precision)
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"--model_dir {model_dir}: no such directory (expected a local MGM checkpoint folder)")
    check_writable(args.output_dir)
    if args.backend != "onnxruntime":
        import_tensorrt(args.backend)

    log(f"loading the vision weights from {model_dir}")
    cfg = MGMConfig.from_model_dir(model_dir)
    encoder = load_vision(model_dir, dtype=torch.float32, device="cpu", config=cfg)
    return build_vision(
        encoder,
        cfg,
        args.output_dir,
        dtype=dtype,
        max_batch_size=args.max_batch_size,
        backend=args.backend,
        timing_cache=args.timing_cache,
        keep_onnx=args.keep_onnx,
        opset=args.opset,
        exporter=args.exporter,
        verify=not args.no_verify,
        compute_capabilities=args.compute_capability,
        workspace_gb=args.workspace_gb,
        log=log,
        source={"model_dir": str(model_dir.resolve())},
        precision=args.precision,
        max_rel_l2=args.max_rel_l2,
    )


def register_command(subparsers) -> None:
    """`mgm-build vision` (the mgm_build.commands entry point)."""
    help_text = "vision towers + mining + projector -> ONNX / TensorRT"
    add_vision_arguments(subparsers.add_parser("vision", help=help_text, description=help_text)).set_defaults(
        run=run_vision_build
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m build_engines.vision ...` is `mgm-build vision ...`."""
    from build_engines.cli import run_command

    return run_command(register_command, argv)


if __name__ == "__main__":
    sys.exit(main())
