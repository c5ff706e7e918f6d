"""mgm-bench results: the data classes, the ratios, the Markdown report and the PNG plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SCALING_TARGET = 2.0  # issue 5: throughput at concurrency 4 >= 2x concurrency 1


@dataclass
class ServedRow:
    concurrency: int
    throughput: float  # requests/s, perf_analyzer's "Inferences/Second"
    latency_ms: dict  # whole request (all of a stream): mean, p50, p90, p99 (perf_analyzer)
    ttft_ms: dict  # from the profile export's per-response timestamps
    itl_ms: dict
    requests: int  # measured requests
    mean_output_tokens: float | None
    tokens_per_s: float | None
    stable: bool = True  # False: perf_analyzer's stability check was relaxed to get a number
    server: dict = field(default_factory=dict)  # per model: requests, avg_batch, compute/queue ms (Triton stats)


@dataclass
class BaselineResult:
    """The in-process mgm_ref run: one request at a time, HF generate, greedy."""

    requests: int
    wall_s: float
    throughput: float  # requests/s
    tokens_per_s: float
    latency_ms: dict
    ttft_ms: dict
    itl_ms: dict
    mean_output_tokens: float
    answers: dict = field(default_factory=dict, repr=False)  # "prompt|image bytes" -> text


@dataclass
class BenchResult:
    settings: dict
    rows: list[ServedRow]
    baseline: BaselineResult | None
    parity: tuple[int, int] | None = None  # (served answers equal to in-process, items compared)

    def row(self, concurrency: int) -> ServedRow | None:
        return next((r for r in self.rows if r.concurrency == concurrency), None)

    def ratios(self) -> dict:
        out: dict = {}
        c1, c4 = self.row(1), self.row(4)
        if c1 and c4 and c1.throughput > 0:
            out["scaling_c4_over_c1"] = c4.throughput / c1.throughput
        if self.baseline and self.baseline.throughput > 0:
            out["served_over_in_process"] = {r.concurrency: r.throughput / self.baseline.throughput for r in self.rows}
            if c1:
                out["one_request_latency_served_over_in_process"] = _div(
                    c1.latency_ms["p50"], self.baseline.latency_ms["p50"]
                )
                out["one_request_ttft_served_over_in_process"] = _div(c1.ttft_ms["p50"], self.baseline.ttft_ms["p50"])
        return out

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["baseline"]:
            data["baseline"].pop("answers")
        data["ratios"] = self.ratios()
        return data


def _div(a, b):
    return a / b if a is not None and b else None


def _f(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


# ------------------------------------------------------------------------------------------------ text
def table(result: BenchResult) -> str:
    ratios = result.ratios().get("served_over_in_process", {})
    lines = [
        "| concurrency | req/s | output tok/s | latency p50 / p90 / p99 (ms) | TTFT p50 / p90 (ms) "
        "| ITL mean (ms) | tokens/req | requests | x in-process req/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.concurrency}{'' if r.stable else ' (unstable)'} | {_f(r.throughput, 2)} | {_f(r.tokens_per_s)} "
            f"| {_f(r.latency_ms['p50'])} / {_f(r.latency_ms['p90'])} / {_f(r.latency_ms['p99'])} "
            f"| {_f(r.ttft_ms['p50'])} / {_f(r.ttft_ms['p90'])} | {_f(r.itl_ms['mean'], 2)} "
            f"| {_f(r.mean_output_tokens)} | {r.requests} | {_f(ratios.get(r.concurrency), 2)} |"
        )
    b = result.baseline
    if b:
        lines.append(
            f"| in-process, 1 at a time | {_f(b.throughput, 2)} | {_f(b.tokens_per_s)} "
            f"| {_f(b.latency_ms['p50'])} / {_f(b.latency_ms['p90'])} / {_f(b.latency_ms['p99'])} "
            f"| {_f(b.ttft_ms['p50'])} / {_f(b.ttft_ms['p90'])} | {_f(b.itl_ms['mean'], 2)} "
            f"| {_f(b.mean_output_tokens)} | {b.requests} | 1.00 |"
        )
    return "\n".join(lines)


PIPELINE_ORDER = ("preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing", "mgm_bls", "ensemble")


def server_table(result: BenchResult) -> str:
    """Triton's per-model statistics over each perf_analyzer run (incl. its stabilization windows)."""
    names = [n for n in PIPELINE_ORDER if any(n in r.server for r in result.rows)]
    names += sorted({n for r in result.rows for n in r.server} - set(names))
    if not names:
        return ""
    lines = ["| concurrency | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for r in result.rows:
        cells = []
        for n in names:
            m = r.server.get(n)
            cells.append(
                "-"
                if not m
                else f"{_f(m['avg_batch'], 2)} / {_f(m['compute_ms_per_execution'])} / {_f(m['queue_ms_per_request'])}"
            )
        lines.append(f"| {r.concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(result: BenchResult) -> list[str]:
    ratios, out = result.ratios(), []
    c1, c4 = result.row(1), result.row(4)
    if "scaling_c4_over_c1" in ratios:
        s = ratios["scaling_c4_over_c1"]
        verdict = "met" if s >= SCALING_TARGET else "NOT met"
        out.append(
            f"Served throughput, concurrency 4 vs 1: {c4.throughput:.2f} vs {c1.throughput:.2f} req/s = "
            f"**{s:.2f}x** (target >= {SCALING_TARGET:.0f}x from in-flight batching: {verdict})."
        )
    else:
        out.append("Concurrency 4 vs 1: not measured (run with --concurrency including 1 and 4).")
    b = result.baseline
    if b and c1:
        lat = ratios.get("one_request_latency_served_over_in_process")
        out.append(
            f"One request (concurrency 1, p50): served {_f(c1.latency_ms['p50'])} ms vs in-process "
            f"{_f(b.latency_ms['p50'])} ms: served / in-process = **{_f(lat, 2)}**"
            + (f" ({1 / lat:.1f}x faster served)." if lat and lat < 1 else ".")
        )
        ttft = ratios.get("one_request_ttft_served_over_in_process")
        out.append(
            f"Time to first token (concurrency 1, p50): served {_f(c1.ttft_ms['p50'])} ms vs in-process "
            f"{_f(b.ttft_ms['p50'])} ms (served / in-process = {_f(ttft, 2)})."
        )
        best = max(result.rows, key=lambda r: r.throughput)
        out.append(
            f"Best served throughput: {best.throughput:.2f} req/s at concurrency {best.concurrency} = "
            f"{best.throughput / b.throughput:.2f}x the in-process {b.throughput:.2f} req/s."
        )
    elif not b:
        out.append("No in-process baseline in this run (it needs --model_dir or --start_server).")
    if result.parity:
        same, n = result.parity
        out.append(f"Greedy answers identical to the in-process ones for {same} of {n} workload items.")
    return out


def write_report(result: BenchResult, out_dir: Path, plots: Sequence[Path]) -> Path:
    s = result.settings
    lines = [
        f"# mgm-bench serve: {s['model']} on {s['url']}",
        "",
        f"- command: `{s['command']}`",
        f"- model repository: `{s['model']}` over gRPC (perf_analyzer --streaming; the models are decoupled), "
        f"stream={s['stream']}, max_tokens={s['max_tokens']}, greedy",
        f"- workload: {s['workload']}",
        f"- output tokens: {s.get('tokens', 'n/a')}",
        f"- measurement: {s['measurement']}",
        f"- checkpoint (baseline): `{s.get('model_dir') or 'none'}`",
        f"- host: {s['host']}",
        "",
        "## Results",
        "",
        table(result),
        "",
        "Latency is the whole request (every streamed response); TTFT is the first response that carries "
        "text; ITL = (latency - TTFT) / (output tokens - 1), per request, then averaged; output tok/s = req/s x "
        "mean output tokens. The in-process row runs the same workload through mgm_ref in this process "
        "(`MGM.chat`: image decode, vision, HF generate), one request after the other.",
        "",
        *(
            [
                "## Server side (Triton statistics per model: average batch / compute ms per execution / queue ms "
                "per request)",
                "",
                server_table(result),
                "",
                "The decoupled python models (tensorrt_llm, mgm_bls) return from execute() before their answers "
                "finish, so their compute time is not the generation time.",
                "",
            ]
            if server_table(result)
            else []
        ),
        "## Findings",
        "",
        *[f"- {line}" for line in findings(result)],
        "",
    ]
    if plots:
        lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
    return path


# ------------------------------------------------------------------------------------------------ plots
def plot(result: BenchResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, b = result.rows, result.baseline
    cs = [r.concurrency for r in rows]
    paths = []

    def nan(value):
        return float("nan") if value is None else value

    def hline(ax, value, label):
        if value is not None:
            ax.axhline(value, ls="--", c="gray", label=label)

    def finish(fig, ax_list, name):
        for ax in ax_list:
            ax.set_xlabel("concurrency")
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(cs, [r.throughput for r in rows], "o-", label="served")
    ax2.plot(cs, [nan(r.tokens_per_s) for r in rows], "o-", label="served")
    if b:
        hline(ax1, b.throughput, "in-process")
        hline(ax2, b.tokens_per_s, "in-process")
    ax1.set_ylabel("requests / s")
    ax2.set_ylabel("output tokens / s")
    fig.suptitle(f"throughput: {result.settings['model']}, max_tokens {result.settings['max_tokens']}")
    finish(fig, (ax1, ax2), "throughput_vs_concurrency.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(cs, [nan(r.latency_ms[p]) for r in rows], style, label=f"served {p}")
    if b:
        hline(ax, b.latency_ms["p50"], "in-process p50")
    ax.set_ylabel("request latency (ms)")
    ax.set_title("latency percentiles")
    finish(fig, (ax,), "latency_vs_concurrency.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for p, style in (("p50", "o-"), ("p90", "s--")):
        ax1.plot(cs, [nan(r.ttft_ms[p]) for r in rows], style, label=f"served TTFT {p}")
    ax2.plot(cs, [nan(r.itl_ms["mean"]) for r in rows], "o-", label="served ITL mean")
    if b:
        hline(ax1, b.ttft_ms["p50"], "in-process TTFT p50")
        hline(ax2, b.itl_ms["mean"], "in-process ITL mean")
    ax1.set_ylabel("time to first token (ms)")
    ax2.set_ylabel("inter-token latency (ms)")
    fig.suptitle("streaming: TTFT and inter-token latency")
    finish(fig, (ax1, ax2), "ttft_vs_concurrency.png")
    return paths
