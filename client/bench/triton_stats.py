"""Triton's cumulative per-model statistics, and their difference over one measurement."""

from __future__ import annotations


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
        out[m["name"]] = {
            "inferences": int(m.get("inference_count") or 0),
            "executions": int(m.get("execution_count") or 0),
            "queue_ns": int(inf.get("queue", {}).get("ns") or 0),
            "compute_ns": int(inf.get("compute_infer", {}).get("ns") or 0),
        }
    return out


def stats_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model over one perf_analyzer run: requests, average batch, compute ms per execution, queue ms."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        n, e = (a[k] - b.get(k, 0) for k in ("inferences", "executions"))
        if n <= 0:
            continue
        out[name] = {
            "requests": n,
            "avg_batch": n / e if e else None,
            "compute_ms_per_execution": (a["compute_ns"] - b.get("compute_ns", 0)) / e / 1e6 if e else None,
            "queue_ms_per_request": (a["queue_ns"] - b.get("queue_ns", 0)) / n / 1e6,
        }
    return out
