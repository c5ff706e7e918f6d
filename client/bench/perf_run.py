"""One perf_analyzer run per concurrency level against a served model, read into a ServedRow.

gRPC --streaming (the models are decoupled); throughput and latency percentiles from its CSV, TTFT and
inter-token latency from the per-response timestamps of its --profile-export-file, Triton's own
per-model statistics around the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from client.bench.common import BenchError, log
from client.bench.data import StreamStats, stream_stats
from client.bench.report import ServedRow
from client.bench.triton_stats import server_stats, stats_delta

UNSTABLE = "Failed to obtain stable measurement"
RELAXED_STABILITY = 1000  # percent: accept whatever the windows give (the row is marked unstable)


def perf_args(
    url: str,
    model: str,
    input_data: Path,
    concurrency: int,
    export: Path,
    csv: Path,
    *,
    measurement_interval_ms: int = 4000,
    request_count: int = 0,
    stability: float = 25,
    max_trials: int = 8,
) -> list[str]:
    """perf_analyzer arguments for one concurrency level (gRPC streaming: the models are decoupled)."""
    args = [
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--streaming",
        "--input-data",
        str(input_data),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-f",
        str(csv),
        "--profile-export-file",
        str(export),
    ]
    if request_count:
        return args + ["--request-count", str(max(request_count, concurrency))]
    return args + [
        "--measurement-interval",
        str(measurement_interval_ms),
        "-s",
        f"{stability:g}",
        "--max-trials",
        str(max_trials),
    ]


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


def run_served(
    url: str,
    model: str,
    input_data: Path,
    concurrency: int,
    raw_dir: Path,
    args,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[ServedRow, StreamStats]:
    from client.perf import parse_summary, run_perf_analyzer

    export, csv = raw_dir / f"profile_c{concurrency}.json", raw_dir / f"perf_c{concurrency}.csv"
    options = dict(
        measurement_interval_ms=args.measurement_interval_ms,
        request_count=args.request_count,
        stability=args.stability_percentage,
        max_trials=args.max_trials,
    )
    timeout = 120 + (args.max_trials + 2) * args.measurement_interval_ms / 1000 * 3
    stable = True
    before = server_stats(url)
    result = run_perf_analyzer(
        perf_args(url, model, input_data, concurrency, export, csv, **options), timeout=timeout, check=False
    )
    if result.returncode != 0 and UNSTABLE in result.stdout + result.stderr and not args.request_count:
        log(
            f"concurrency {concurrency}: no stable measurement at {args.stability_percentage:g}%; "
            "measuring again without the stability check (the row is marked unstable)"
        )
        stable = False
        options["stability"] = RELAXED_STABILITY
        result = run_perf_analyzer(
            perf_args(url, model, input_data, concurrency, export, csv, **options), timeout=timeout, check=False
        )
    (raw_dir / f"perf_c{concurrency}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise BenchError(
            f"perf_analyzer failed at concurrency {concurrency} (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-3000:]}"
        )
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
        concurrency=concurrency,
        throughput=throughput,
        latency_ms={"mean": mean_latency_ms, "p50": perf["p50"], "p90": perf["p90"], "p99": perf["p99"]},
        ttft_ms=stats.ttft_ms,
        itl_ms=stats.itl_ms,
        requests=len(stats.requests),
        mean_output_tokens=tokens,
        tokens_per_s=throughput * tokens if tokens is not None else None,
        stable=stable,
        server=server,
    )
    return row, stats
