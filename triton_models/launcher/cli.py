"""`mgm-serve`: run a Triton Inference Server on a model repository until it exits or is signalled.

mgm-serve --model_repo triton_models/repo --http_port 8000
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from triton_models import variants
from triton_models.launcher.errors import ServerError
from triton_models.launcher.process import TritonServer


def add_server_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_repo", required=True, type=Path, help="Triton model repository")
    parser.add_argument("--http_port", type=int, default=8000)
    parser.add_argument("--grpc_port", type=int, default=8001)
    parser.add_argument("--metrics_port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1", help="address for all endpoints (0.0.0.0 to serve other hosts)")
    parser.add_argument(
        "--world_size", type=int, default=1, help="tensor-parallel ranks: one tritonserver per rank under mpirun"
    )
    parser.add_argument("--log_verbose", type=int, default=0, help="tritonserver --log-verbose")
    parser.add_argument(
        "--ready_timeout",
        type=float,
        default=300.0,
        help="seconds to wait for /v2/health/ready (engine loading can be slow)",
    )
    return parser


def _exit_code(returncode: int | None) -> int:
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128+N


def _forward_signals(server: TritonServer) -> list[int]:
    """First SIGINT/SIGTERM asks the server to shut down; a second one kills its group."""
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        if len(received) == 1:
            print(f"mgm-serve: {signal.Signals(signum).name}, shutting the server down", file=sys.stderr, flush=True)
            server.send_signal(signal.SIGTERM)
        else:
            server.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return received


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgm-serve", description="Run Triton on a model repository.")
    variants.add_openai_arguments(add_server_arguments(parser))
    args = parser.parse_args(argv)
    server = TritonServer(
        args.model_repo,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        host=args.host,
        world_size=args.world_size,
        log_verbose=args.log_verbose,
        echo=True,
        extra_args=variants.tolerant_server_args(args.model_repo),
    )
    received = _forward_signals(server)
    try:
        server.start(timeout=args.ready_timeout)
    except ServerError as exc:
        server.stop()
        if received:  # asked to stop while loading: not an error worth a log dump
            return _exit_code(server.returncode)
        print(f"mgm-serve: {exc}", file=sys.stderr)
        return _exit_code(server.returncode) or 1
    print(
        f"mgm-serve: ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}",
        file=sys.stderr,
        flush=True,
    )
    with variants.openai_sidecar(args, server.grpc_url):
        return _exit_code(server.wait())


if __name__ == "__main__":
    sys.exit(main())
