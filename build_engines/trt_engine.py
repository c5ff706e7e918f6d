"""Model-agnostic TensorRT engine build (TensorRT 10 Python API); the runner is mgm_runtime.trt_runner.

The same code drives full TensorRT (`tensorrt`, GPU hosts / NGC containers) and TensorRT-RTX
(`tensorrt_rtx`, pip-installable, builds ahead of time without a GPU). Networks are created
STRONGLY_TYPED: every tensor's precision comes from the ONNX graph (fp32 / fp16 / bf16 export),
so no precision flags are set and both libraries build the same network.

`build_engine` parses with OnnxParser (reporting every failing node: operator, name, index,
parser source location), adds one optimization profile (min / opt / max per input), reuses and
updates a timing cache, reports progress, and writes the serialized engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mgm_runtime.trt_runner import BACKENDS, EngineBuildError, TensorRTUnavailable, import_tensorrt, make_trt_logger  # noqa: F401  (re-exported: the build's error types)


@dataclass(frozen=True)
class InputProfile:
    """Shapes of one network input for the optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"profile for {self.name}: min/opt/max ranks differ: {self.min} {self.opt} {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not lo <= mid <= hi:
                raise ValueError(
                    f"profile for {self.name}: need min <= opt <= max, got {self.min} {self.opt} {self.max}"
                )


@dataclass
class BuildResult:
    engine_path: Path
    backend: str
    trt_version: str
    inputs: list[dict] = field(default_factory=list)  # [{name, dtype, shape}] shape with -1 for dynamic
    outputs: list[dict] = field(default_factory=list)
    build_seconds: float = 0.0
    engine_bytes: int = 0


def batch_profile(max_batch_size: int) -> tuple[int, int, int]:
    """(min, opt, max) batch sizes, as TensorRT-LLM's multimodal builder chooses them."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return 1, max(1, max_batch_size // 2), max_batch_size


def _make_progress_monitor(trt, echo: Callable[[str], None], min_interval_s: float = 5.0):
    class _Progress(trt.IProgressMonitor):
        """Prints top-level build phases and, at most every few seconds, step counts of long ones."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}
            self._parents: dict[str, str | None] = {}
            self._last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._steps[phase_name] = num_steps
            self._parents[phase_name] = parent_phase
            if parent_phase is None:
                echo(f"[TRT] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            now = time.monotonic()
            if now - self._last >= min_interval_s:
                self._last = now
                echo(f"[TRT]   {phase_name}: {step + 1}/{self._steps.get(phase_name, '?')}")
            return True  # never cancel

        def phase_finish(self, phase_name):
            if self._parents.get(phase_name) is None:
                echo(f"[TRT] {phase_name} done")

    return _Progress()


def describe_parser_errors(parser) -> list[str]:
    """One line per parser error: code, failing node (index, name, operator), parser source location."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        parts = [f"{err.code()}: {err.desc()}"]
        node = err.node()
        if node >= 0:
            parts.append(f"node #{node} name={err.node_name()!r} op={err.node_operator()!r}")
        try:
            stack = list(err.local_function_stack())
        except Exception:  # older bindings
            stack = []
        if stack:
            parts.append("in local function " + " > ".join(stack))
        parts.append(f"(parser {err.file()}:{err.line()} {err.func()})")
        lines.append(" ".join(parts))
    return lines


def _tensor_info(t) -> dict:
    return {"name": t.name, "dtype": str(t.dtype).rsplit(".", 1)[-1].lower(), "shape": [int(d) for d in t.shape]}


def attach_timing_cache(config, path: Path, echo: Callable[[str], None]):
    """Load `path` into the builder config; a cache TensorRT rejects (set_timing_cache returns False:
    another TensorRT version or GPU) is replaced by a new one, and the log says so."""
    blob = path.read_bytes() if path.is_file() else b""
    cache_obj = config.create_timing_cache(blob)
    if config.set_timing_cache(cache_obj, ignore_mismatch=False):
        echo(f"timing cache: {'loaded ' + str(len(blob)) + ' bytes from' if blob else 'new,'} {path}")
        return cache_obj
    if not blob:
        raise RuntimeError(f"TensorRT refused even an empty timing cache for {path}")
    echo(
        f"timing cache: {path} ({len(blob)} bytes) was rejected by this TensorRT/GPU (a stale cache); "
        "building with a new one, which overwrites it afterwards"
    )
    cache_obj = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache_obj, ignore_mismatch=False):
        raise RuntimeError(f"TensorRT refused a new timing cache for {path}")
    return cache_obj


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: Sequence[InputProfile],
    backend: str = "tensorrt",
    timing_cache: str | Path | None = None,
    workspace_bytes: int | None = None,
    compute_capabilities: Sequence[str] | None = None,
    tf32: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] | None = print,
) -> BuildResult:
    """Parse `onnx_path`, build a strongly typed engine with one optimization profile, write it.

    - `profiles`: one InputProfile per dynamic network input.
    - `timing_cache`: file read if present and rewritten after the build (full TensorRT only;
      TensorRT-RTX has no timing cache, the argument is ignored there with a note).
    - `compute_capabilities`: TensorRT-RTX targets, e.g. ["SM80", "SM86", "SM89", "SM120"]
      (default: the library's default). Ignored by full TensorRT, which builds for the local GPU.
    - `tf32`: allow TF32 for float32 layers (off by default so a float32 engine matches float32 ONNX).
    """
    echo = log or (lambda _m: None)
    trt = import_tensorrt(backend)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path}: no such ONNX graph")

    logger = make_trt_logger(trt, verbose, echo)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)

    t0 = time.perf_counter()
    echo(f"parsing {onnx_path} with {backend} {trt.__version__}")
    if not parser.parse_from_file(str(onnx_path)):
        details = describe_parser_errors(parser) or logger.errors or ["(the parser gave no details)"]
        raise EngineBuildError(
            f"{backend} could not parse {onnx_path} ({len(details)} error(s)):\n  " + "\n  ".join(details)
        )
    echo(f"parsed {network.num_layers} layers, {network.num_inputs} inputs, {network.num_outputs} outputs")

    config = builder.create_builder_config()
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT enables TF32 by default: float32 matmuls/convs would then carry ~1e-3 relative error.
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))

    by_name = {p.name: p for p in profiles}
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    unknown = set(by_name) - {t.name for t in net_inputs}
    if unknown:
        raise EngineBuildError(
            f"profiles name inputs the network does not have: {sorted(unknown)}; "
            f"network inputs: {[t.name for t in net_inputs]}"
        )
    profile = builder.create_optimization_profile()
    for t in net_inputs:
        p = by_name.get(t.name)
        dims = tuple(t.shape)
        if p is None:
            if any(d < 0 for d in dims):
                raise EngineBuildError(f"input {t.name} has dynamic shape {dims} but no profile was given")
            continue
        if len(p.min) != len(dims) or any(
            d >= 0 and (d, d, d) != (lo, mid, hi) for d, lo, mid, hi in zip(dims, p.min, p.opt, p.max, strict=True)
        ):
            raise EngineBuildError(
                f"profile for {t.name} min={p.min} opt={p.opt} max={p.max} does not fit its shape {dims}"
            )
        profile.set_shape(t.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)

    cache_obj = None
    if timing_cache is not None:
        if backend == "tensorrt_rtx":
            echo("note: TensorRT-RTX has no timing cache (its builder ignores one); --timing_cache unused")
        else:
            cache_obj = attach_timing_cache(config, Path(timing_cache), echo)

    if compute_capabilities and backend == "tensorrt_rtx":
        ccs = [getattr(trt.ComputeCapability, c.upper()) for c in compute_capabilities]
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(cc, i)

    try:
        config.progress_monitor = _make_progress_monitor(trt, echo)
    except (AttributeError, TypeError):
        pass

    echo("building the engine (this takes minutes for full-size models)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        msg = "\n  ".join(logger.errors) or "(no error message from the builder)"
        raise EngineBuildError(f"{backend} failed to build an engine from {onnx_path}:\n  {msg}")

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with open(engine_path, "wb") as f:
        f.write(serialized)
    if cache_obj is not None:
        Path(timing_cache).write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))

    result = BuildResult(
        engine_path=engine_path,
        backend=backend,
        trt_version=trt.__version__,
        inputs=[_tensor_info(t) for t in net_inputs],
        outputs=[_tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
        build_seconds=time.perf_counter() - t0,
        engine_bytes=engine_path.stat().st_size,
    )
    echo(f"wrote {engine_path} ({result.engine_bytes / 2**20:.1f} MiB) in {result.build_seconds:.1f}s")
    return result
