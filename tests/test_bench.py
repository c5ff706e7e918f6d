"""mgm-bench: the perf_analyzer input data, TTFT / ITL from a profile export, the report, and a short real run."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from client.bench import cli as bench
from client.bench.data import (
    make_workload,
    parse_image_sizes,
    perf_input_data,
    stream_stats,
    summarize,
    synthetic_image,
)
from client.bench.perf_run import perf_args
from client.bench.report import BaselineResult, BenchResult, ServedRow, findings, plot, table, write_report
from client.bench.serve import parse_concurrency


def test_input_data_carries_the_exact_image_bytes():
    sizes = ((64, 48, "PNG"), (96, 80, "JPEG"))
    items = make_workload(sizes, ["Describe it.", "What colour is the sky?"])
    assert [i.image_name for i in items] == ["64x48.png", "96x80.jpeg"] * 2
    data = json.loads(json.dumps(perf_input_data(items, max_tokens=7, stream=True)))
    assert len(data["data"]) == 4
    for item, step in zip(items, data["data"], strict=True):
        blob = base64.b64decode(step["image_input"]["b64"])
        assert blob == item.image and step["image_input"]["shape"] == [len(item.image)]
        image = Image.open(io.BytesIO(blob))
        assert f"{image.width}x{image.height}.{image.format.lower()}" == item.image_name
        assert step["text_input"] == [item.prompt] and step["max_tokens"] == [7]
        assert step["temperature"] == [0.0] and step["stream"] == [True]
    # the ensemble has no `stream` input
    assert all("stream" not in s for s in perf_input_data(items, 7, stream=None)["data"])


def test_synthetic_images_are_deterministic_and_sizes_parse():
    assert synthetic_image(120, 90, "JPEG", seed=3) == synthetic_image(120, 90, "JPEG", seed=3)
    assert synthetic_image(120, 90, "PNG", seed=3) != synthetic_image(120, 90, "PNG", seed=4)
    assert parse_image_sizes("320x240:png, 640x480") == ((320, 240, "PNG"), (640, 480, "JPEG"))
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_image_sizes("320by240")


MS = 1_000_000  # ns


def export(*requests, concurrency=1):
    return {
        "experiments": [
            {
                "experiment": {"mode": "concurrency", "value": concurrency},
                "requests": list(requests),
                "window_boundaries": [],
            }
        ],
        "version": "2.51.0",
    }


def req(sent_ms, responses, prompt="Describe it.", image_bytes=3):
    return {
        "timestamp": sent_ms * MS,
        "request_inputs": {"text_input": prompt, "image_input": [1] * image_bytes},
        "response_timestamps": [t * MS for t, _ in responses],
        "response_outputs": [o for _, o in responses],
    }


def test_ttft_and_itl_from_a_profile_export():
    streamed = req(
        1000,
        [
            (1100, {"text_output": "Hello", "output_token_count": 2}),
            (1110, {"text_output": " world", "output_token_count": 3}),
            (1130, {"text_output": "", "output_token_count": 5}),
        ],
    )  # empty FINAL response
    late_text = req(
        2000,
        [
            (2050, {"text_output": "", "output_token_count": 1}),  # no text yet: not the TTFT
            (2080, {"text_output": "Hi", "output_token_count": 2}),
            (2090, {"text_output": " there", "output_token_count": 3}),
        ],
        prompt="Other",
    )
    stats = stream_stats(export(streamed, late_text))
    a, b = stats.requests
    assert (a.latency_ms, a.ttft_ms, a.output_tokens, a.text) == (130, 100, 5, "Hello world")
    assert a.itl_ms == pytest.approx((130 - 100) / 4)
    assert (b.ttft_ms, b.latency_ms, b.output_tokens, b.itl_ms) == (80, 90, 3, pytest.approx(5))
    assert a.key == ("Describe it.", 3) and b.key == ("Other", 3)
    assert stats.ttft_ms["mean"] == pytest.approx(90) and stats.itl_ms["mean"] == pytest.approx(6.25)
    assert stats.mean_output_tokens == 4 and stats.responses_per_request == 3
    assert stats.span_s == pytest.approx(1.09) and stats.throughput == pytest.approx(2 / 1.09)

    # one experiment out of several; a one-piece answer (ensemble): tokens counted from the text, no ITL
    one_piece = req(0, [(200, {"text_output": "a b c"})])
    data = export(streamed)
    data["experiments"] += export(one_piece, concurrency=4)["experiments"]
    (r,) = stream_stats(data, concurrency=4, count_tokens=lambda t: len(t.split())).requests
    assert (r.ttft_ms, r.latency_ms, r.output_tokens, r.itl_ms) == (200, 200, 3, None)
    # no response outputs at all: timestamps still give TTFT and latency
    bare = {"timestamp": 0, "response_timestamps": [5 * MS, 9 * MS]}
    (r,) = stream_stats(export(bare)).requests
    assert (r.ttft_ms, r.latency_ms, r.output_tokens) == (5, 9, None)
    assert summarize([])["p50"] is None


def test_perf_args_for_time_windows_and_request_counts(tmp_path):
    args = perf_args(
        "h:1",
        "mgm_bls",
        tmp_path / "in.json",
        4,
        tmp_path / "e.json",
        tmp_path / "c.csv",
        measurement_interval_ms=3000,
        stability=30,
        max_trials=5,
    )
    line = " ".join(args)
    assert "-i grpc --streaming" in line and "--concurrency-range 4:4" in line
    assert "--measurement-interval 3000 -s 30 --max-trials 5" in line and "--profile-export-file" in line
    args = perf_args(
        "h:1", "ensemble", tmp_path / "in.json", 4, tmp_path / "e.json", tmp_path / "c.csv", request_count=2
    )
    assert args[-2:] == ["--request-count", "4"] and "--measurement-interval" not in args
    assert parse_concurrency("4,1,2,2") == [1, 2, 4]


def _row(c, rps, ttft):
    lat = {"mean": 1000 / rps, "p50": 1000 / rps, "p90": 1200 / rps, "p99": 1300 / rps}
    return ServedRow(
        c,
        rps,
        lat,
        {"mean": ttft, "p50": ttft, "p90": ttft * 1.5, "p99": ttft * 2},
        {"mean": 3.0, "p50": 3.0, "p90": 4.0, "p99": 5.0},
        10,
        32.0,
        rps * 32,
    )


def test_report_ratios_and_plots_without_a_server(tmp_path):
    base = BaselineResult(
        9,
        9.0,
        1.0,
        32.0,
        {"mean": 1000, "p50": 1000, "p90": 1100, "p99": 1200},
        {"mean": 600, "p50": 600, "p90": 700, "p99": 800},
        {"mean": 10, "p50": 10, "p90": 11, "p99": 12},
        32.0,
    )
    result = BenchResult(
        {
            "command": "mgm-bench serve",
            "model": "mgm_bls",
            "url": "h:1",
            "stream": True,
            "max_tokens": 32,
            "workload": "w",
            "measurement": "m",
            "host": "h",
        },
        [_row(1, 2.0, 300), _row(2, 3.0, 350), _row(4, 5.0, 400)],
        base,
        parity=(9, 9),
    )
    result.rows[2].server = {
        "vision_encoder": {
            "requests": 8,
            "avg_batch": 2.0,
            "compute_ms_per_execution": 50.0,
            "queue_ms_per_request": 4.0,
        }
    }
    ratios = result.ratios()
    assert ratios["scaling_c4_over_c1"] == pytest.approx(2.5)
    assert ratios["served_over_in_process"] == {1: 2.0, 2: 3.0, 4: 5.0}
    assert ratios["one_request_latency_served_over_in_process"] == pytest.approx(0.5)
    assert ratios["one_request_ttft_served_over_in_process"] == pytest.approx(0.5)
    assert "2.50x" in findings(result)[0] and "met" in findings(result)[0]
    assert table(result).count("\n") == 5
    plots = plot(result, tmp_path)
    report = write_report(result, tmp_path, plots).read_text()
    assert all(p.stat().st_size > 1000 and p.name in report for p in plots)
    assert "| 4 | 2.00 / 50.0 / 4.0 |" in report and "| 1 | - |" in report
    assert json.loads((tmp_path / "results.json").read_text())["ratios"]["scaling_c4_over_c1"] == 2.5


def test_llm_engine_benchmark_runs_and_matches_hf_generate(capsys):
    assert (
        bench.main(
            [
                "llm_engine",
                "--size",
                "tiny",
                "--device",
                "cpu",
                "--requests",
                "2",
                "--text_len",
                "8",
                "--new_tokens",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"\| engine, 2 concurrent \(in-flight\) \| [\d.]+ \| \d+ \|", out), out
    assert "greedy tokens identical to HF for 2/2 requests" in out


@pytest.mark.slow
def test_vision_benchmark_runs_on_the_tiny_towers(tmp_path, capsys):
    rc = bench.main(
        [
            "vision",
            "--tiny",
            "--batch_sizes",
            "1",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--work_dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results, "the vision benchmark wrote no results"


def test_unknown_benchmark_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["nope"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.server
def test_short_served_run_writes_a_report(tiny_checkpoints, tmp_path):
    out = tmp_path / "report"
    rc = bench.main(
        [
            "serve",
            "--start_server",
            "--model_dir",
            str(tiny_checkpoints("llama")),
            "--work_dir",
            str(tmp_path / "work"),
            "--output_dir",
            str(out),
            "--concurrency",
            "1,2",
            "--max_tokens",
            "4",
            "--request_count",
            "3",
            "--baseline_requests",
            "2",
            "--image_sizes",
            "320x240:png,640x480:jpeg",
            "--prompts",
            "Describe it.",
            "What is this?",
        ]
    )
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["concurrency"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["throughput"] > 0 and row["requests"] >= 3 and row["mean_output_tokens"] > 0
        assert 0 < row["ttft_ms"]["p50"] <= row["latency_ms"]["p99"] and row["latency_ms"]["p50"] > 0
        assert row["itl_ms"]["mean"] is not None
    assert data["baseline"]["throughput"] > 0 and data["baseline"]["ttft_ms"]["p50"] > 0
    assert set(data["ratios"]["served_over_in_process"]) == {"1", "2"}
    assert data["ratios"]["one_request_latency_served_over_in_process"] > 0
    report = (out / "report.md").read_text()
    assert re.search(r"\| 1 \| [\d.]+ \| [\d.,]+ \|", report) and "in-process, 1 at a time" in report
    for name in ("throughput_vs_concurrency.png", "latency_vs_concurrency.png", "ttft_vs_concurrency.png"):
        assert (out / name).stat().st_size > 1000
    assert not list((out / "raw").glob("profile_*.json"))  # large exports are not kept by default


@pytest.mark.server
def test_multiturn_benchmark_compares_cached_and_uncached_variants(tmp_path, capsys):
    out = tmp_path / "multiturn.json"
    rc = bench.main(
        ["multiturn", "--chats", "2", "--turns", "3", "--concurrency", "2", "--max_tokens", "4"]
        + ["--work_dir", str(tmp_path / "work"), "--output_file", str(out)]
    )
    assert rc == 0  # 1 would mean the two variants answered differently
    level = json.loads(out.read_text())["results"]["2"]
    assert level["identical_answers"] is True
    for variant in ("cached", "uncached"):
        assert set(level[variant]["ttft_p50_ms_by_turn"]) == {"1", "2", "3"}
        assert level[variant]["turns_per_s"] > 0
    counters = level["cached"]["cache_counters"]
    # 2 chats x 3 turns: each image misses once and hits twice; turns 2-3 reuse their prefix
    assert any("hit" in k and v == 4 for k, v in counters.items()), counters
    assert any("miss" in k and v == 2 for k, v in counters.items()), counters
    assert not any("hit" in k and v for k, v in level["uncached"]["cache_counters"].items())
    assert "turn 2+ TTFT speed-up" in capsys.readouterr().out
