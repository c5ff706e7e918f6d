"""Vision path benchmark: PyTorch eager (mgm_ref) vs the built artifact, same inputs, same run.
One file: each backend runs in a child process of this module (clean peak-RSS numbers), so the
workers, the FLOP/peak measurements and the report share its helpers.

    mgm-bench vision [--hd] [--batch_sizes 1 4] [--iters 3] [--device auto|cpu|cuda] [--profile 15]
                     [--backends eager-fp32 onnxruntime bfloat16 int8] [--exporter dynamo|torchscript]

Model: the real MGM-7B vision sizes with random weights (CLIP ViT-L/14-336 + ConvNeXt-L at 768, or
1536 with --hd, patch info mining, projector to 4096). `--tiny` uses the test-sized towers instead.

- CPU (default without a GPU): eager float32 PyTorch (mgm_ref, the original operation order) vs the
  ONNX Runtime float32 artifact that `mgm-build vision --backend onnxruntime` writes (re-associated
  mining), and its two reduced-precision modes (`--precision bfloat16`: PyTorch under bf16 autocast;
  `--precision int8`: ONNX Runtime with int8 weight MatMuls). Targets at batch 1: the float32 artifact
  >= 3x faster than eager, and within 2x of its FLOP floor.
- GPU with TensorRT: eager float16 PyTorch on the GPU vs the float16 TensorRT engine.
- GPU without TensorRT: eager float16 (and float32) PyTorch on the GPU.

Per backend it reports latency, GFLOP per image counted from the ONNX graph (MatMul/Gemm/Conv; eager
is the artifact's count with the reference mining's in place of the re-associated one), achieved
GFLOP/s, and the fraction of the machine's float32 matmul peak, measured with one large GEMM in the
same run (the FLOP floor is GFLOP / peak). The machine's load average is printed, with a warning
when it exceeds the thread count: timings are then distorted. `--profile N` adds ONNX Runtime's
per-node profile (top N op types and nodes).

Each backend runs in its own child process, one after the other, so that the peak memory reported
(max RSS on CPU, torch's peak allocation on GPU) is that backend's alone. Outputs are compared
against the eager float32 run (relative L2). This is a benchmark, not a test: it prints, and exits
non-zero only when a run fails or outputs disagree beyond the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

SEED = 0
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-2, "int8": 5e-2}
CPU_PRECISION_KINDS = ("bfloat16", "int8")  # backends that are the CPU artifact in that --precision


# ------------------------------------------------------------------------------------------------
def real_config(hd: bool = False, hidden_size: int = 4096, tiny: bool = False):
    """MGMConfig with MGM-7B's vision sizes (the LLM part is never built here)."""
    from mgm_ref.config import MGMConfig

    raw = {
        "architectures": ["MGMLlamaForCausalLM"],
        "model_type": "mgm",
        "hidden_size": hidden_size,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "image_size_aux": 1536 if hd else 768,
        "image_grid": 2 if hd else 1,
        "image_global": hd,
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
    }
    if tiny:
        from mgm_ref.tiny import CLIP_TINY, CONVNEXT_TINY

        raw.update(
            mm_vision_tower_config=CLIP_TINY,
            mm_vision_tower_aux_config=CONVNEXT_TINY,
            mm_hidden_size=CLIP_TINY["hidden_size"],
            mm_hidden_size_aux=sum(CONVNEXT_TINY["dims"]),
        )
    return MGMConfig.from_dict(raw, source="bench")


def make_encoder(cfg):
    """Random-weight encoder; the same seed gives the same weights in every process."""
    import torch

    from mgm_ref.vision import MGMVisionEncoder

    torch.manual_seed(SEED)
    return MGMVisionEncoder(cfg).eval()


def inputs_for(cfg, batch: int):
    from build_engines.vision import VisionGraphSpec

    return VisionGraphSpec.from_config(cfg).dummy_inputs(batch, seed=1000 + batch)


def _peak_rss_mb() -> float:
    """This process's own peak RSS. getrusage's ru_maxrss is not: Linux carries it over fork and exec,
    so a spawned child would report the parent's peak (the artifact builds') when that is higher."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024.0)


# ------------------------------------------------------------------------------------------------
# FLOPs, the matmul peak, the per-node profile
# ------------------------------------------------------------------------------------------------
def measure_matmul_peak(threads: int, n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of one large float32 GEMM (n x n by n x n) on `threads` threads, best of `repeats`,
    through PyTorch and through ONNX Runtime's MatMul; the faster library sets the peak."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    feeds = {"a": np.ascontiguousarray(a.numpy()), "b": np.ascontiguousarray(b.numpy())}
    best = float("inf")
    for run in (lambda: a @ b, lambda: session.run(None, feeds)):
        run()  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def measure_low_precision_peaks(threads: int, n: int = 4096, repeats: int = 3) -> dict:
    """GFLOP/s of one n^3 GEMM in each reduced-precision mode's own kernel: PyTorch under bf16
    autocast (oneDNN), and ONNX Runtime's dynamically quantised MatMul (int8 weights, VNNI)."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from build_engines.vision_cpu import quantize_int8

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / min(times) / 1e9

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a @ b

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(b.numpy(), "w")],
    )
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "gemm.onnx", Path(tmp) / "gemm-int8.onnx"
        import onnx

        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32_path)
        quantize_int8(fp32_path, int8_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(int8_path), opts, providers=["CPUExecutionProvider"])
    feeds = {"a": np.ascontiguousarray(a.numpy())}
    return {"bfloat16": best(bf16), "int8": best(lambda: session.run(None, feeds))}


def graph_gflop_per_image(onnx_path: Path, cfg, batch: int = 1) -> float:
    from build_engines.onnx_flops import count_flops
    from build_engines.vision import VisionGraphSpec

    shapes = {name: (batch, *shape) for name, shape in VisionGraphSpec.from_config(cfg).input_shapes.items()}
    return count_flops(onnx_path, shapes).gflop / batch


def mining_gflop(cfg, work: Path) -> dict:
    """GFLOP of patch info mining per LR view, reference order vs re-associated, each counted from an
    ONNX export of the mining alone at this config's sizes."""
    import torch

    from build_engines.onnx_export import export_onnx
    from build_engines.onnx_flops import count_flops
    from build_engines.vision_graph import MiningOnly, random_mining_projectors

    tokens = cfg.tokens_per_image // cfg.views_per_image
    side = cfg.image_size_aux // 4 // cfg.image_grid  # HR map side per view
    shapes = {"lr": (1, tokens, cfg.mm_hidden_size), "hr": (1, cfg.mm_hidden_size_aux, side, side)}
    holder = random_mining_projectors(cfg.mm_hidden_size, cfg.mm_hidden_size_aux)
    out = {}
    for name, reassociated in (("reference", False), ("reassociated", True)):
        path = work / f"mining-{name}-{cfg.mm_hidden_size}-{cfg.mm_hidden_size_aux}-{side}.onnx"
        if not path.is_file():
            dummy = tuple(torch.randn(s) for s in shapes.values())
            export_onnx(MiningOnly(holder, reassociated).eval(), dummy, path, ["lr", "hr"], ["tokens"], {}, log=None)
        out[name] = count_flops(path, shapes).gflop
    return out


def ort_node_profile(onnx_path: Path, feeds: dict, threads: int, top: int = 15) -> dict:
    """One warm-up and one profiled ONNX Runtime run: time per op type and the slowest nodes."""
    import collections

    import onnxruntime as ort

    from mgm_runtime.ort_runner import session_options

    opts = session_options(threads)  # the artifact runner's own options
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(onnx_path).parent / "ort-profile")
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up: left out of the table below
    t = time.perf_counter()
    session.run(None, feeds)
    wall = time.perf_counter() - t
    events = json.loads(Path(session.end_profiling()).read_text())
    last = max((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    events = [e for e in events if last["ts"] <= e.get("ts", -1) <= last["ts"] + last["dur"]]
    by_op, count, by_node = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"] / 1e6
            count[op] += 1
            by_node[(e["name"].removesuffix("_kernel_time"), op)] += e["dur"] / 1e6
    return {
        "wall_s": wall,
        "node_s": sum(by_op.values()),
        "ops": [(op, count[op], sec) for op, sec in by_op.most_common(top)],
        "nodes": [(name, op, sec) for (name, op), sec in by_node.most_common(top)],
    }


def load_warning(threads: int) -> str:
    load = os.getloadavg()
    note = f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {threads} threads"
    if load[0] > threads:
        note += " -- WARNING: above the thread count, other processes compete for the cores and distort timings"
    return note


# ------------------------------------------------------------------------------------------------
# One backend, in a child process
# ------------------------------------------------------------------------------------------------
def _child(kind: str, opts: dict, queue) -> None:
    try:
        queue.put(_run_backend(kind, opts))
    except BaseException as e:  # report, never hang the parent
        import traceback

        queue.put({"kind": kind, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def _run_backend(kind: str, opts: dict) -> dict:
    import numpy as np
    import torch

    threads = opts["threads"]
    torch.set_num_threads(threads)
    cfg = real_config(opts["hd"], tiny=opts["tiny"])
    if kind == "matmul-peak":
        return {"kind": kind, "gflops": measure_matmul_peak(threads), **measure_low_precision_peaks(threads)}
    if kind == "onnxruntime-profile":
        images, images_aux = inputs_for(cfg, 1)
        onnx_path = Path(opts["artifacts"]["onnxruntime"]) / "model.onnx"
        return {
            "kind": kind,
            **ort_node_profile(
                onnx_path, {"images": images.numpy(), "images_aux": images_aux.numpy()}, threads, opts["profile"]
            ),
        }
    device = "cuda" if kind.endswith("cuda") or kind == "tensorrt" else "cpu"
    t0 = time.perf_counter()
    if kind.startswith("eager"):
        dtype = torch.float16 if "fp16" in kind else torch.float32
        model = make_encoder(cfg).to(device=device, dtype=dtype)

        def run(images, images_aux):
            with torch.inference_mode():
                out = model(images.to(device, dtype), images_aux.to(device, dtype))
            return out
    else:
        from mgm_runtime.vision_artifact import load_vision_artifact

        _, runner = load_vision_artifact(opts["artifacts"][kind], threads=threads)

        def run(images, images_aux):
            return runner(images=images, images_aux=images_aux)["image_features"]

    load_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    results = {"kind": kind, "device": device, "load_s": load_s, "batches": {}}
    for batch in opts["batch_sizes"]:
        images, images_aux = inputs_for(cfg, batch)
        out = None
        for _ in range(opts["warmup"]):
            out = run(images, images_aux)
        times, cpu_times = [], []
        for _ in range(opts["iters"]):
            if device == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            out = run(images, images_aux)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        out = out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
        path = Path(opts["work_dir"]) / f"out-{kind}-b{batch}.npy"
        np.save(path, out)
        results["batches"][batch] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "times": times,
            "cpu_median_s": statistics.median(cpu_times),
            "output": str(path),
        }
        print(
            f"  {kind:>14} batch {batch}: median {statistics.median(times) * 1000:9.1f} ms wall, "
            f"{statistics.median(cpu_times) * 1000:9.1f} ms CPU time ({len(times)} runs; "
            f"load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    results["peak_rss_mb"] = _peak_rss_mb()
    if device == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def run_in_child(kind: str, opts: dict, timeout_s: float) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, opts, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception:
        result = {"kind": kind, "error": f"no result within {timeout_s:.0f}s (killed)"}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    if "error" not in result and proc.exitcode not in (0, None):
        result = {"kind": kind, "error": f"child exited with {proc.exitcode}"}
    if proc.exitcode and proc.exitcode < 0:
        result.setdefault("error", f"child killed by signal {-proc.exitcode} (out of memory?)")
    return result


# ------------------------------------------------------------------------------------------------
def build_artifact(
    cfg, out_dir: Path, backend: str, dtype: str, max_batch: int, exporter: str, precision: str | None = None
) -> Path:
    """Build (or reuse) one artifact. A reduced `precision` is always measured against float32 at build
    time (the build prints it and refuses it above its limit); float32 builds skip that check here,
    since every backend's output is compared with eager float32 below."""
    from build_engines.vision import build_vision

    precision = precision or dtype
    config_path = out_dir / "config.json"
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if (
            old.get("backend"),
            old.get("precision"),
            old.get("max_batch_size"),
            old.get("hd"),
            old.get("exporter"),
        ) == (backend, precision, max_batch, cfg.hd, "torch.export" if precision == "bfloat16" else exporter):
            print(f"reusing {out_dir} (built earlier with the same options)", flush=True)
            return out_dir
    t = time.perf_counter()
    # keep_onnx: the FLOPs are counted from the graph
    build_vision(
        make_encoder(cfg),
        cfg,
        out_dir,
        dtype=dtype,
        max_batch_size=max_batch,
        backend=backend,
        exporter=exporter,
        keep_onnx=precision == dtype,
        verify=precision != dtype,
        precision=precision if precision != dtype else None,
    )
    print(f"built the {backend} {precision} artifact ({exporter} export) in {time.perf_counter() - t:.0f}s", flush=True)
    return out_dir


def plan(device: str) -> tuple[str, list[str], str | None, str]:
    """(device, backends to time, artifact backend or None, artifact dtype)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device, ["eager-fp32", "onnxruntime", *CPU_PRECISION_KINDS], "onnxruntime", "float32"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    try:
        import tensorrt  # noqa: F401

        return device, ["eager-fp32-cuda", "eager-fp16-cuda", "tensorrt"], "tensorrt", "float16"
    except ImportError:
        print("TensorRT is not installed: timing eager PyTorch on the GPU only", flush=True)
        return device, ["eager-fp32-cuda", "eager-fp16-cuda"], None, "float16"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hd", action="store_true", help="MGM-7B-HD sizes (5 LR views, ConvNeXt at 1536)")
    p.add_argument("--tiny", action="store_true", help="test-sized towers (a quick smoke run)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both backends (default: all cores)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="how the artifact is exported"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print ONNX Runtime's per-node profile of the artifact at batch 1 (top N)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="time only these (default on CPU: eager-fp32 onnxruntime bfloat16 int8; the first is the reference)",
    )
    p.add_argument("--work_dir", default=None, help="where the artifact and outputs go (reused across runs)")
    p.add_argument("--timeout_s", type=float, default=3600, help="per backend")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from mgm_runtime.ort_runner import default_threads

    threads = args.threads or default_threads()
    device, kinds, artifact_backend, artifact_dtype = plan(args.device)
    if args.backends:
        unknown = set(args.backends) - set(kinds)
        if unknown:
            raise SystemExit(f"--backends {sorted(unknown)}: this device times {kinds}")
        kinds = [k for k in kinds if k in args.backends]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-vision-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = real_config(args.hd, tiny=args.tiny)
    sizes = (
        "tiny towers"
        if args.tiny
        else (f"CLIP ViT-L/14-336 + ConvNeXt-L at {cfg.image_size_aux} + mining + projector to {cfg.hidden_size}")
    )
    print(
        f"MGM-7B{'-HD' if args.hd else ''} vision ({sizes}), random weights; device {device}, "
        f"{threads} CPU threads; batches {args.batch_sizes}; {args.warmup} warm-up + {args.iters} timed runs",
        flush=True,
    )
    print(load_warning(threads), flush=True)

    artifact = None
    artifacts = {}
    if artifact_backend:
        # the float32 artifact is always built: the FLOPs of every artifact kind are counted from its graph
        for kind in [artifact_backend if artifact_backend == "onnxruntime" else "tensorrt"] + [
            k for k in kinds if k in CPU_PRECISION_KINDS
        ]:
            precision = kind if kind in CPU_PRECISION_KINDS else artifact_dtype
            artifacts[kind] = str(
                build_artifact(
                    cfg,
                    work / f"{artifact_backend}-{precision}-{'hd' if args.hd else 'normal'}"
                    f"{'-tiny' if args.tiny else ''}-{args.exporter}",
                    artifact_backend,
                    artifact_dtype,
                    max(args.batch_sizes),
                    args.exporter,
                    precision,
                )
            )
        artifact = artifacts["onnxruntime" if artifact_backend == "onnxruntime" else "tensorrt"]
    opts = {
        "threads": threads,
        "hd": args.hd,
        "tiny": args.tiny,
        "batch_sizes": args.batch_sizes,
        "warmup": args.warmup,
        "iters": args.iters,
        "work_dir": str(work),
        "artifacts": artifacts,
        "profile": args.profile,
    }

    results = {}
    extra = ["matmul-peak"] + (["onnxruntime-profile"] if args.profile and "onnxruntime" in kinds else [])
    for kind in [*kinds, *extra]:
        print(f"timing {kind} ...", flush=True)
        results[kind] = run_in_child(kind, opts, args.timeout_s)
        if "error" in results[kind]:
            print(f"  {kind} failed: {results[kind]['error']}\n{results[kind].get('traceback', '')}", flush=True)
    end_load = load_warning(threads)

    # ---- FLOPs -------------------------------------------------------------------------------
    mining = mining_gflop(cfg, work)
    views = cfg.views_per_image
    gflop = {}
    onnx_path = (
        Path(artifact) / ("model.onnx" if artifact_backend == "onnxruntime" else "onnx/model.onnx")
        if artifact
        else None
    )
    if onnx_path is not None and onnx_path.is_file():
        gflop["artifact"] = graph_gflop_per_image(onnx_path, cfg)
        gflop["eager"] = gflop["artifact"] + views * (mining["reference"] - mining["reassociated"])
    peak = results["matmul-peak"].get("gflops")
    # each mode's own GEMM peak (bf16 autocast, int8 VNNI); float32 kinds use the float32 peak
    own_peak = {k: results["matmul-peak"].get(k) for k in CPU_PRECISION_KINDS}

    # ---- report ------------------------------------------------------------------------------
    import numpy as np

    from mgm_runtime.numerics import rel_l2

    base = kinds[0]  # eager float32: the reference output
    fast = "onnxruntime" if "onnxruntime" in kinds else kinds[-1]  # the float32 artifact: the targets' subject
    slow = "eager-fp16-cuda" if fast == "tensorrt" else base
    ok = all("error" not in r for r in results.values())
    print()
    print(
        f"patch info mining per LR view: {mining['reference']:.1f} GFLOP in the reference order, "
        f"{mining['reassociated']:.2f} re-associated ({mining['reference'] / mining['reassociated']:.0f}x fewer); "
        f"{views} view(s) per image"
    )
    if peak:
        print(
            f"float32 matmul peak (one 4096^3 GEMM, best of PyTorch and ONNX Runtime, {threads} threads): "
            f"{peak:.0f} GFLOP/s" + "".join(f"; {k} GEMM {v:.0f} GFLOP/s" for k, v in own_peak.items() if v)
        )
    print()
    print(
        f"| backend | batch | median latency (ms) | per image (ms) | speed-up vs {slow} | CPU time (ms) | "
        f"CPU-time ratio | GFLOP / image | GFLOP/s | % of fp32 matmul peak | latency / FLOP floor | "
        f"% of own-precision GEMM peak | rel L2 vs {base} | peak memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for kind in kinds:
        r = results[kind]
        if "error" in r:
            print(f"| {kind} | - | failed | | | | | | | | | | | |")
            continue
        mem = f"{r['peak_rss_mb'] / 1024:.1f} GiB RSS" + (
            f", {r['peak_gpu_mb'] / 1024:.1f} GiB GPU" if "peak_gpu_mb" in r else ""
        )
        g = gflop.get("eager" if kind.startswith("eager") else "artifact")
        for batch in args.batch_sizes:
            b = r["batches"][batch]
            ratio = cpu_ratio = ""
            if "error" not in results.get(slow, {"error": 1}):
                ratio = f"{results[slow]['batches'][batch]['median_s'] / b['median_s']:.2f}x"
                cpu_ratio = f"{results[slow]['batches'][batch]['cpu_median_s'] / b['cpu_median_s']:.2f}x"
            err = ""
            if "error" not in results.get(base, {"error": 1}):
                err_v = rel_l2(np.load(b["output"]), np.load(results[base]["batches"][batch]["output"]))
                err = f"{err_v:.1e}"
                tol = TOLERANCE[
                    kind
                    if kind in CPU_PRECISION_KINDS
                    else "float16"
                    if ("fp16" in kind or kind == "tensorrt")
                    else "float32"
                ]
                if err_v > tol:
                    ok = False
                    err += f" (> {tol:.0e}!)"
            per_image = b["median_s"] / batch
            rate = pct = floor = own = ""
            if g:
                rate = f"{g / per_image:.0f}"
                if peak and device == "cpu":
                    pct = f"{100 * g / per_image / peak:.0f}%"
                    floor = f"{per_image / (g / peak):.2f}x"
                    summary[(kind, batch)] = per_image / (g / peak)
                    mode_peak = own_peak.get(kind) or peak
                    own = f"{100 * g / per_image / mode_peak:.0f}%"
            print(
                f"| {kind} | {batch} | {b['median_s'] * 1000:.1f} | {per_image * 1000:.1f} | {ratio} | "
                f"{b['cpu_median_s'] * 1000:.0f} | {cpu_ratio} | {f'{g:.1f}' if g else ''} | {rate} | {pct} | "
                f"{floor} | {own} | {err} | {mem} |"
            )
    print(f"\nload average at the start: see above; at the end: {end_load}")
    if device == "cpu" and ok:
        b1 = args.batch_sizes[0]
        r1 = results[base]["batches"][b1]["median_s"] / results[fast]["batches"][b1]["median_s"]
        print(
            f"ONNX Runtime is {r1:.2f}x faster than eager PyTorch at batch {b1} "
            f"({'meets' if r1 >= 3 else 'misses'} the 3x target; wall-clock ratio, CPU-time ratio in the table)"
        )
        if (fast, b1) in summary:
            f1 = summary[(fast, b1)]
            print(
                f"ONNX Runtime runs at {f1:.2f}x its FLOP floor at batch {b1} "
                f"({'meets' if f1 <= 2 else 'misses'} the 2x target)"
            )
    prof = results.get("onnxruntime-profile")
    if prof and "error" not in prof:
        print(
            f"\nONNX Runtime per-node profile, batch 1 ({prof['wall_s']:.2f} s wall, {prof['node_s']:.2f} s in nodes):"
        )
        print("| op type | nodes | seconds | share |\n|---|---|---|---|")
        for op, n, sec in prof["ops"]:
            print(f"| {op} | {n} | {sec:.3f} | {100 * sec / prof['node_s']:.1f}% |")
        print("\n| slowest nodes | op | seconds |\n|---|---|---|")
        for name, op, sec in prof["nodes"]:
            print(f"| {name} | {op} | {sec:.3f} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": device,
                    "threads": threads,
                    "hd": args.hd,
                    "tiny": args.tiny,
                    "gflop_per_image": gflop,
                    "mining_gflop_per_view": mining,
                    "matmul_peak_gflops": peak,
                    "mode_peak_gflops": own_peak,
                    "results": results,
                },
                indent=2,
                default=str,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
