"""`mgm-bench serve`: served throughput / latency / TTFT of the MGM stack against the in-process reference.

    mgm-bench serve --start_server                       # issue 5: tiny model served on CPU, concurrency 1,2,4
    mgm-bench serve --url 127.0.0.1:8001 --model mgm_bls --concurrency 1,2,4,8 --model_dir CKPT

`serve` sends a fixed workload (synthetic scenes of several sizes, PNG and JPEG, x several prompts) to
a running server with perf_analyzer (gRPC --streaming: the models are decoupled), one perf_analyzer
run per concurrency, and reads throughput and latency percentiles from its CSV and TTFT / inter-token
latency from the per-response timestamps of its --profile-export-file. The same workload then runs
through the in-process reference (`mgm_ref`, the original repo's way: one request at a time, HF
generate, greedy) as the baseline of the same run. It writes report.md, results.json and PNG plots to
--output_dir and prints the table. `--start_server` builds the CPU model repository for --model_dir
(default: the built-in tiny checkpoint), starts tritonserver on free loopback ports and stops it after.

Exit status: 0 when every run produced numbers (whether or not the targets were met), 2 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path

from client.bench.baseline import parity, run_baseline
from client.bench.common import DEFAULT_WORK, BenchError, log
from client.bench.data import IMAGE_SIZES, PROMPTS, WorkItem, make_workload, parse_image_sizes, write_input_data
from client.bench.perf_run import run_served
from client.bench.report import BenchResult, findings, plot, table, write_report


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency: expected e.g. 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency: expected positive integers, got {text!r}")
    return sorted(set(values))


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


def host_description() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (load average {load} "
        f"at start), Python {platform.python_version()}"
    )


def run_serve(args, argv: Sequence[str]) -> int:
    out = Path(args.output_dir)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    items = make_workload(args.image_sizes, args.prompts)
    stream = args.streaming if args.model == "mgm_bls" else None
    input_data = write_input_data(raw / "input_data.json", items, args.max_tokens, stream)
    model_dir = Path(args.model_dir) if args.model_dir else None
    settings = {
        "command": "mgm-bench " + shlex.join(argv),
        "model": args.model,
        "stream": stream,
        "max_tokens": args.max_tokens,
        "workload": f"{len(items)} requests in turn: {len(args.prompts)} prompts x images "
        f"{', '.join(sorted({i.image_name for i in items}, key=lambda n: int(n.split('x')[0])))}",
        "measurement": (
            f"{args.request_count} requests per concurrency (throughput = requests / their span)"
            if args.request_count
            else f"time windows of {args.measurement_interval_ms} ms, stability "
            f"{args.stability_percentage:g}%, up to {args.max_trials} windows"
        ),
        "host": host_description(),
        "tokens": (
            "output_token_count reported by mgm_bls"
            if args.model == "mgm_bls"
            else "the answers re-tokenized with the checkpoint's tokenizer (needs --model_dir)"
        ),
    }

    server = None
    try:
        if args.start_server:
            from client.cpu_repo import prepare_cpu_repo
            from triton_models.server import TritonServer

            model_dir, repo = prepare_cpu_repo(model_dir, Path(args.work_dir), args.max_batch_size, log=log)
            log(f"starting tritonserver on {repo}")
            server = TritonServer(repo, allow_admin_api=True).start(timeout=300)  # perf_analyzer reads configs
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
            log(
                f"  {row.throughput:.2f} req/s, p50 {row.latency_ms['p50']:.0f} ms, "
                f"TTFT p50 {row.ttft_ms['p50'] or float('nan'):.0f} ms, {row.requests} requests"
            )
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

    result = BenchResult(settings, rows, baseline, parity(first_stats, baseline) if baseline and first_stats else None)
    plots = plot(result, out)
    report = write_report(result, out, plots)
    print()
    print(table(result))
    print()
    for line in findings(result):
        print(f"- {line.replace('**', '')}")
    print(f"\nreport: {report}\nplots: {', '.join(str(p) for p in plots)}")
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC host:port")
    p.add_argument("--model", choices=["mgm_bls", "ensemble"], default="mgm_bls")
    p.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mgm_bls streams token by token (stream=true); perf_analyzer always uses gRPC streaming",
    )
    p.add_argument("--concurrency", type=parse_concurrency, default=[1, 2, 4], help="e.g. 1,2,4,8")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--measurement_interval_ms", type=int, default=4000, help="perf_analyzer time window")
    p.add_argument("--stability_percentage", type=float, default=25)
    p.add_argument("--max_trials", type=int, default=8, help="perf_analyzer windows before giving up on stability")
    p.add_argument(
        "--request_count",
        type=int,
        default=0,
        help="send exactly this many requests per concurrency instead of time windows (quick runs)",
    )
    p.add_argument(
        "--image_sizes",
        type=parse_image_sizes,
        default=IMAGE_SIZES,
        help="e.g. 320x240:png,640x480:jpeg,1024x768:jpeg (the default)",
    )
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--output_dir", default=str(DEFAULT_WORK / "report"))
    p.add_argument(
        "--model_dir",
        default=None,
        help="MGM checkpoint for the in-process baseline (and for --start_server; default there: "
        "the built-in tiny llama checkpoint)",
    )
    p.add_argument(
        "--baseline_requests",
        type=int,
        default=-1,
        help="in-process requests (-1: each workload item once; 0: no baseline)",
    )
    p.add_argument(
        "--start_server",
        action="store_true",
        help="build the CPU model repository for --model_dir and serve it on free loopback ports",
    )
    p.add_argument("--work_dir", default=str(DEFAULT_WORK), help="where --start_server builds (reused)")
    p.add_argument("--max_batch_size", type=int, default=8, help="for --start_server's model repository")
    p.add_argument("--keep_exports", action="store_true", help="keep perf_analyzer's profile exports (large)")
    return p
