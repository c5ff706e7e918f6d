"""`mgm-bench`: benchmarks of the MGM stack.

    mgm-bench serve --start_server                       # issue 5: tiny model served on CPU, concurrency 1,2,4
    mgm-bench serve --url 127.0.0.1:8001 --model mgm_bls --concurrency 1,2,4,8 --model_dir CKPT
    mgm-bench vision [benchmarks/bench_vision.py arguments]

`serve` sends a fixed workload (synthetic scenes of several sizes, PNG and JPEG, x several prompts) to
a running server with perf_analyzer (gRPC --streaming: the models are decoupled), one perf_analyzer
run per concurrency, and reads throughput and latency percentiles from its CSV and TTFT / inter-token
latency from the per-response timestamps of its --profile-export-file. The same workload then runs
through the in-process reference (`mgm_ref`, the original repo's way: one request at a time, HF
generate, greedy) as the baseline of the same run. It writes report.md, results.json and PNG plots to
--output_dir and prints the table. `--start_server` builds the CPU model repository for --model_dir
(default: the built-in tiny checkpoint), starts tritonserver on free loopback ports and stops it after.

Exit status: 0 when every run produced numbers (whether or not the targets were met), 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from client.bench_data import (IMAGE_SIZES, PROMPTS, StreamStats, WorkItem, make_workload, parse_image_sizes,
                               stream_stats, summarize, write_input_data)
from client.bench_report import BaselineResult, BenchResult, ServedRow, findings, plot, table, write_report

DEFAULT_WORK = Path(os.environ.get("MGM_WORK_DIR", "work_dirs/bench"))
UNSTABLE = "Failed to obtain stable measurement"
RELAXED_STABILITY = 1000  # percent: accept whatever the windows give (the row is marked unstable)


class BenchError(RuntimeError):
    """A benchmark run failed or gave no usable numbers."""


def log(message: str) -> None:
    print(f"[mgm-bench] {message}", flush=True)


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency: expected e.g. 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency: expected positive integers, got {text!r}")
    return sorted(set(values))


# ------------------------------------------------------------------------------------------------ served
def perf_args(url: str, model: str, input_data: Path, concurrency: int, export: Path, csv: Path, *,
              measurement_interval_ms: int = 4000, request_count: int = 0, stability: float = 25,
              max_trials: int = 8) -> list[str]:
    """perf_analyzer arguments for one concurrency level (gRPC streaming: the models are decoupled)."""
    args = ["-m", model, "-u", url, "-i", "grpc", "--streaming", "--input-data", str(input_data),
            "--concurrency-range", f"{concurrency}:{concurrency}", "-f", str(csv),
            "--profile-export-file", str(export)]
    if request_count:
        return args + ["--request-count", str(max(request_count, concurrency))]
    return args + ["--measurement-interval", str(measurement_interval_ms), "-s", f"{stability:g}",
                   "--max-trials", str(max_trials)]


def read_perf_csv(path: Path) -> dict[str, float]:
    """The one data row of perf_analyzer's -f CSV: throughput and latency percentiles (usec -> ms)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise BenchError(f"{path}: perf_analyzer wrote no result row")
    row = rows[-1]
    out = {"throughput": float(row["Inferences/Second"])}
    for p in ("p50", "p90", "p99"):
        out[p] = float(row[f"{p} latency"]) / 1000
    return out


def run_served(url: str, model: str, input_data: Path, concurrency: int, raw_dir: Path, args,
               count_tokens: Callable[[str], int] | None = None) -> tuple[ServedRow, StreamStats]:
    from client.perf import parse_summary, run_perf_analyzer

    export, csv = raw_dir / f"profile_c{concurrency}.json", raw_dir / f"perf_c{concurrency}.csv"
    options = dict(measurement_interval_ms=args.measurement_interval_ms, request_count=args.request_count,
                   stability=args.stability_percentage, max_trials=args.max_trials)
    timeout = 120 + (args.max_trials + 2) * args.measurement_interval_ms / 1000 * 3
    stable = True
    before = server_stats(url)
    result = run_perf_analyzer(perf_args(url, model, input_data, concurrency, export, csv, **options),
                               timeout=timeout, check=False)
    if result.returncode != 0 and UNSTABLE in result.stdout + result.stderr and not args.request_count:
        log(f"concurrency {concurrency}: no stable measurement at {args.stability_percentage:g}%; "
            "measuring again without the stability check (the row is marked unstable)")
        stable = False
        options["stability"] = RELAXED_STABILITY
        result = run_perf_analyzer(perf_args(url, model, input_data, concurrency, export, csv, **options),
                                   timeout=timeout, check=False)
    (raw_dir / f"perf_c{concurrency}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise BenchError(f"perf_analyzer failed at concurrency {concurrency} (exit {result.returncode}):\n"
                         f"{(result.stdout + result.stderr)[-3000:]}")
    server = stats_delta(before, server_stats(url))
    perf = read_perf_csv(csv)
    mean_latency_ms = parse_summary(result.stdout)[-1].latency_us / 1000
    stats = stream_stats(export, concurrency, count_tokens)
    if not args.keep_exports:
        export.unlink(missing_ok=True)  # it stores every request's image: large
    if not stats.requests:
        raise BenchError(f"concurrency {concurrency}: the profile export holds no answered request")
    empty = sum(1 for r in stats.requests if not r.text.strip())
    if empty:
        raise BenchError(f"concurrency {concurrency}: {empty} of {len(stats.requests)} answers were empty")
    tokens = stats.mean_output_tokens
    # time windows: perf_analyzer's requests per window; a --request-count run: requests over their span
    throughput = stats.throughput if args.request_count and stats.throughput else perf["throughput"]
    row = ServedRow(
        concurrency=concurrency, throughput=throughput,
        latency_ms={"mean": mean_latency_ms, "p50": perf["p50"], "p90": perf["p90"], "p99": perf["p99"]},
        ttft_ms=stats.ttft_ms, itl_ms=stats.itl_ms, requests=len(stats.requests), mean_output_tokens=tokens,
        tokens_per_s=throughput * tokens if tokens is not None else None, stable=stable, server=server)
    return row, stats


def server_stats(url: str) -> dict[str, dict[str, int]]:
    """Triton's cumulative per-model statistics ({} when the server does not give them)."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            stats = client.get_inference_statistics(as_json=True)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - statistics are a bonus, never a failure
        return {}
    out = {}
    for m in stats.get("model_stats", []):
        inf = m.get("inference_stats", {})
        out[m["name"]] = {"inferences": int(m.get("inference_count") or 0),
                          "executions": int(m.get("execution_count") or 0),
                          "queue_ns": int(inf.get("queue", {}).get("ns") or 0),
                          "compute_ns": int(inf.get("compute_infer", {}).get("ns") or 0)}
    return out


def stats_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model over one perf_analyzer run: requests, average batch, compute ms per execution, queue ms."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        n, e = (a[k] - b.get(k, 0) for k in ("inferences", "executions"))
        if n <= 0:
            continue
        out[name] = {"requests": n, "avg_batch": n / e if e else None,
                     "compute_ms_per_execution": (a["compute_ns"] - b.get("compute_ns", 0)) / e / 1e6 if e else None,
                     "queue_ms_per_request": (a["queue_ns"] - b.get("queue_ns", 0)) / n / 1e6}
    return out


def warm_up(url: str, model: str, items: Sequence[WorkItem]) -> None:
    """One short request per image size, so that no measured request pays for a cold start."""
    from client.mgm_client import MGMClient

    client = MGMClient(url, model=model, timeout_s=300)
    client.wait_ready(timeout_s=60)
    seen = set()
    for item in items:
        if item.image_name not in seen:
            seen.add(item.image_name)
            client.generate(item.prompt, [item.image], max_tokens=2, temperature=0.0)


# ------------------------------------------------------------------------------------------------ baseline
def _token_timer():
    from transformers.generation.streamers import BaseStreamer

    class TokenTimer(BaseStreamer):
        """Times every generated token: HF generate puts the prompt (2-D) first, then (batch,) per step."""

        def __init__(self):
            self.stamps: list[float] = []
            self.tokens = 0

        def put(self, value):
            if value.dim() == 1:
                self.stamps.append(time.perf_counter())
                self.tokens += int(value.numel())

        def end(self):
            pass

    return TokenTimer


def answer_key(prompt: str, image_bytes: int) -> str:
    return f"{prompt}|{image_bytes}"


def run_baseline(model_dir: Path, items: Sequence[WorkItem], max_tokens: int, n_requests: int) -> BaselineResult:
    """The workload through mgm_ref in this process: `MGM.chat`, one request at a time, greedy."""
    from mgm_ref.loader import load_model
    from mgm_ref.model import GenerationParams
    from mgm_ref.preprocess import load_image

    model = load_model(model_dir)
    timer_cls = _token_timer()
    params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)

    def one(item: WorkItem):
        timer = timer_cls()
        start = time.perf_counter()
        text = model.chat(item.prompt, [load_image(item.image)], params, streamer_factory=lambda tok: timer)
        end = time.perf_counter()
        return start, end, timer, text

    one(items[0])  # warm-up, not timed
    latencies, ttfts, itls, tokens, answers = [], [], [], [], {}
    wall = 0.0
    for k in range(n_requests):
        item = items[k % len(items)]
        start, end, timer, text = one(item)
        wall += end - start
        latencies.append((end - start) * 1000)
        tokens.append(timer.tokens)
        if timer.stamps:
            ttfts.append((timer.stamps[0] - start) * 1000)
            if timer.tokens > 1:
                itls.append(((end - start) * 1000 - ttfts[-1]) / (timer.tokens - 1))
        answers.setdefault(answer_key(*item.key), text)
    del model
    gc.collect()
    return BaselineResult(requests=n_requests, wall_s=wall, throughput=n_requests / wall,
                          tokens_per_s=sum(tokens) / wall, latency_ms=summarize(latencies),
                          ttft_ms=summarize(ttfts), itl_ms=summarize(itls),
                          mean_output_tokens=sum(tokens) / n_requests, answers=answers)


def parity(stats: StreamStats, baseline: BaselineResult) -> tuple[int, int]:
    """(served answers equal to the in-process ones, workload items compared): first answer per item."""
    served: dict[str, str] = {}
    for r in stats.requests:
        if r.key is not None:
            served.setdefault(answer_key(*r.key), r.text)
    keys = [k for k in served if k in baseline.answers]
    return sum(served[k].strip() == baseline.answers[k].strip() for k in keys), len(keys)


# ------------------------------------------------------------------------------------------------ server
def prepare_repo(model_dir: Path | None, work: Path, max_batch_size: int) -> tuple[Path, Path]:
    """(checkpoint, CPU model repository) for `model_dir`, default the built-in tiny llama checkpoint."""
    from build_engines.vision import build_vision
    from mgm_ref.config import MGMConfig
    from mgm_ref.loader import load_vision
    from mgm_ref.tiny import write_tiny_checkpoint
    from triton_models.repo_builder import build_repo

    work.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = work / "tiny-mgm-llama"
        if not (model_dir / "config.json").is_file():
            log(f"writing the built-in tiny llama checkpoint to {model_dir}")
            write_tiny_checkpoint(model_dir, "llama")
    tag = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:8]
    engines = work / "engines" / f"{model_dir.name}-{tag}"
    if not (engines / "vision" / "config.json").is_file():
        log("building the vision artifact (ONNX Runtime, float32)")
        cfg = MGMConfig.from_model_dir(model_dir)
        build_vision(load_vision(model_dir, config=cfg), cfg, engines / "vision", dtype="float32",
                     backend="onnxruntime", max_batch_size=4, verify=False, log=lambda m: None)
    repo = build_repo(model_dir, engines, work / "repo", backend="cpu", max_batch_size=max_batch_size)
    return model_dir, repo


# ------------------------------------------------------------------------------------------------ serve
def host_description() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (load average {load} "
            f"at start), Python {platform.python_version()}")


def run_serve(args, argv: Sequence[str]) -> int:
    out = Path(args.output_dir)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    items = make_workload(args.image_sizes, args.prompts)
    stream = args.streaming if args.model == "mgm_bls" else None
    input_data = write_input_data(raw / "input_data.json", items, args.max_tokens, stream)
    model_dir = Path(args.model_dir) if args.model_dir else None
    settings = {
        "command": "mgm-bench " + shlex.join(argv), "model": args.model, "stream": stream,
        "max_tokens": args.max_tokens,
        "workload": f"{len(items)} requests in turn: {len(args.prompts)} prompts x images "
                    f"{', '.join(sorted({i.image_name for i in items}, key=lambda n: int(n.split('x')[0])))}",
        "measurement": (f"{args.request_count} requests per concurrency (throughput = requests / their span)"
                        if args.request_count else
                        f"time windows of {args.measurement_interval_ms} ms, stability "
                        f"{args.stability_percentage:g}%, up to {args.max_trials} windows"),
        "host": host_description(),
        "tokens": ("output_token_count reported by mgm_bls" if args.model == "mgm_bls" else
                   "the answers re-tokenized with the checkpoint's tokenizer (needs --model_dir)"),
    }

    server = None
    try:
        if args.start_server:
            from triton_models.server import TritonServer

            model_dir, repo = prepare_repo(model_dir, Path(args.work_dir), args.max_batch_size)
            log(f"starting tritonserver on {repo}")
            server = TritonServer(repo).start(timeout=300)
            url = server.grpc_url
        else:
            url = args.url
        settings.update(url=url, model_dir=str(model_dir) if model_dir else None)
        count_tokens = None
        if model_dir is not None:
            from mgm_ref.loader import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
            count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731

        log(f"warming up {args.model} at {url}")
        warm_up(url, args.model, items)
        rows, first_stats = [], None
        for c in args.concurrency:
            log(f"perf_analyzer: {args.model}, concurrency {c}")
            try:
                row, stats = run_served(url, args.model, input_data, c, raw, args, count_tokens)
            except BenchError as e:  # one failed level should not lose the others' numbers
                log(f"  concurrency {c} skipped: {str(e).splitlines()[0]} (log: {raw}/perf_c{c}.log)")
                continue
            first_stats = first_stats or stats
            rows.append(row)
            log(f"  {row.throughput:.2f} req/s, p50 {row.latency_ms['p50']:.0f} ms, "
                f"TTFT p50 {row.ttft_ms['p50'] or float('nan'):.0f} ms, {row.requests} requests")
        if not rows:
            raise BenchError("no concurrency level could be measured")
    finally:
        if server is not None:
            server.stop()

    baseline = None
    if model_dir is not None and args.baseline_requests != 0:
        n = args.baseline_requests if args.baseline_requests > 0 else len(items)
        log(f"in-process baseline: mgm_ref on {model_dir}, {n} requests one at a time")
        baseline = run_baseline(model_dir, items, args.max_tokens, n)

    result = BenchResult(settings, rows, baseline,
                         parity(first_stats, baseline) if baseline and first_stats else None)
    plots = plot(result, out)
    report = write_report(result, out, plots)
    print()
    print(table(result))
    print()
    for line in findings(result):
        print(f"- {line.replace('**', '')}")
    print(f"\nreport: {report}\nplots: {', '.join(str(p) for p in plots)}")
    return 0


# ------------------------------------------------------------------------------------------------ vision
def run_vision(argv: Sequence[str]) -> int:
    """benchmarks/bench_vision.py (not an installed module) in a child process, same arguments."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vision.py"
    if not script.is_file():
        print(f"mgm-bench vision: {script} not found (it ships with the source tree)", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, str(script), *argv])


# ------------------------------------------------------------------------------------------------ CLI
def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC host:port")
    p.add_argument("--model", choices=["mgm_bls", "ensemble"], default="mgm_bls")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                   help="mgm_bls streams token by token (stream=true); perf_analyzer always uses gRPC streaming")
    p.add_argument("--concurrency", type=parse_concurrency, default=[1, 2, 4], help="e.g. 1,2,4,8")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--measurement_interval_ms", type=int, default=4000, help="perf_analyzer time window")
    p.add_argument("--stability_percentage", type=float, default=25)
    p.add_argument("--max_trials", type=int, default=8, help="perf_analyzer windows before giving up on stability")
    p.add_argument("--request_count", type=int, default=0,
                   help="send exactly this many requests per concurrency instead of time windows (quick runs)")
    p.add_argument("--image_sizes", type=parse_image_sizes, default=IMAGE_SIZES,
                   help="e.g. 320x240:png,640x480:jpeg,1024x768:jpeg (the default)")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--output_dir", default=str(DEFAULT_WORK / "report"))
    p.add_argument("--model_dir", default=None,
                   help="MGM checkpoint for the in-process baseline (and for --start_server; default there: "
                        "the built-in tiny llama checkpoint)")
    p.add_argument("--baseline_requests", type=int, default=-1,
                   help="in-process requests (-1: each workload item once; 0: no baseline)")
    p.add_argument("--start_server", action="store_true",
                   help="build the CPU model repository for --model_dir and serve it on free loopback ports")
    p.add_argument("--work_dir", default=str(DEFAULT_WORK), help="where --start_server builds (reused)")
    p.add_argument("--max_batch_size", type=int, default=8, help="for --start_server's model repository")
    p.add_argument("--keep_exports", action="store_true", help="keep perf_analyzer's profile exports (large)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "vision":
        return run_vision(argv[1:])
    if argv and argv[0] == "openai":  # the OpenAI endpoint vs direct gRPC (client/openai_api/bench.py)
        return __import__("client.openai_api.bench", fromlist=["main"]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="mgm-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="served throughput / latency / TTFT vs in-process mgm_ref"))
    sub.add_parser("vision", help="vision path benchmark (benchmarks/bench_vision.py; its own arguments)")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max_tokens must be >= 1")
    from client.mgm_client import ClientError
    from client.perf import PerfAnalyzerError
    from triton_models.server import ServerError

    try:
        return run_serve(args, argv)
    except (BenchError, PerfAnalyzerError, ClientError, ServerError) as e:
        print(f"mgm-bench: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
