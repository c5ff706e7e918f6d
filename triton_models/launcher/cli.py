"""`mgm-serve`: run a Triton Inference Server on a model repository until it exits or is signalled.

mgm-serve --model_repo triton_models/repo --http_port 8000
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from triton_models import variants
from triton_models.launcher.argv import INFERENCE_HEADER, INFERENCE_KEY_ENV
from triton_models.launcher.errors import ServerError
from triton_models.launcher.process import TritonServer
from triton_models.launcher.supervise import Stub

# Exit status when a python-backend stub died: the server cannot heal itself (see README), so
# mgm-serve stops it and exits with this for the orchestrator to restart it.
STUB_DIED_EXIT = 3


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
    parser.add_argument(
        "--allow_admin_api",
        action="store_true",
        help="leave Triton's shared-memory, model-repository, logging, trace and model-config APIs open "
        "to every client (by default they need a per-launch key only mgm-serve holds)",
    )
    parser.add_argument(
        "--restrict_http_inference",
        action="store_true",
        help=f"HTTP inference needs the header `{INFERENCE_HEADER}: ${INFERENCE_KEY_ENV}` (the key is read from "
        "that environment variable); browsers cannot send it cross-origin, so web pages cannot make the "
        "server work. gRPC stays open",
    )
    parser.add_argument(
        "--drain_timeout",
        type=float,
        default=15.0,
        help="on SIGTERM/SIGINT: seconds the entry models (those no ensemble calls) get to finish their "
        "requests, refusing new ones, before the server stops",
    )
    parser.add_argument(
        "--stub_death_grace",
        type=float,
        default=2.0,
        help="after a python-backend stub died: seconds the other requests get to finish before the "
        f"server is killed and mgm-serve exits {STUB_DIED_EXIT}",
    )
    return parser


def _exit_code(returncode: int | None) -> int:
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128+N


def _forward_signals(server: TritonServer, stop_requested: threading.Event, serving: threading.Event) -> list[int]:
    """First SIGINT/SIGTERM asks for a shutdown (a drain once serving, else a plain SIGTERM to the
    loading server); a second one kills the server's group."""
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        if len(received) == 1:
            print(f"mgm-serve: {signal.Signals(signum).name}, shutting the server down", file=sys.stderr, flush=True)
            stop_requested.set()
            if not serving.is_set():
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
    inference_key = os.environ.get(INFERENCE_KEY_ENV) if args.restrict_http_inference else None
    if args.restrict_http_inference and not inference_key:
        parser.error(f"--restrict_http_inference reads the key from ${INFERENCE_KEY_ENV}, which is not set")
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
        allow_admin_api=args.allow_admin_api,
        http_inference_key=inference_key,
    )
    stop_requested, serving = threading.Event(), threading.Event()
    received = _forward_signals(server, stop_requested, serving)
    try:
        server.start(timeout=args.ready_timeout)
    except ServerError as exc:
        server.stop()
        if received:  # asked to stop while loading: not an error worth a log dump
            return _exit_code(server.returncode)
        print(f"mgm-serve: {exc}", file=sys.stderr)
        return _exit_code(server.returncode) or 1
    died: list[Stub] = []
    watch, killer = _supervise(server, received, died, args.stub_death_grace)
    serving.set()  # signals from now on drain the server
    print(
        f"mgm-serve: ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}",
        file=sys.stderr,
        flush=True,
    )
    undrained: list[str] = []
    with variants.openai_sidecar(args, server.grpc_url, server.admin_key):
        while not server.exited() and not stop_requested.wait(0.2):
            pass
        watch.stop()  # from here on stubs end because their models unload
        if stop_requested.is_set() and not server.exited():
            code, undrained = server.shutdown(args.drain_timeout)
        else:
            code = server.wait()
    killer.cancel()
    if server.shm_removed:
        print(f"mgm-serve: removed {server.shm_removed} shm region(s) the server left behind", file=sys.stderr)
    if died:
        return STUB_DIED_EXIT
    if undrained:
        print(f"mgm-serve: the shutdown cut work in flight: {', '.join(undrained)}", file=sys.stderr)
        return _exit_code(code) or 1
    return _exit_code(code)


def _supervise(server: TritonServer, received: list[int], died: list[Stub], grace: float):
    """Watch the stubs; on the first death take the server down (SIGTERM: Triton stops accepting
    connections and turns unready; SIGKILL after `grace`: requests stuck on the dead stub end)."""
    killer = threading.Timer(grace, server.kill)
    killer.daemon = True

    def on_death(stub: Stub) -> None:
        if received or server.exited():  # asked to stop, or the server itself ended: not a stub's fault
            return
        died.append(stub)
        if len(died) > 1:
            return
        print(
            f"mgm-serve: the python backend stub of {stub.instance} (pid {stub.pid}) died; "
            f"stopping the server, exit status {STUB_DIED_EXIT}",
            file=sys.stderr,
            flush=True,
        )
        server.send_signal(signal.SIGTERM)
        killer.start()

    return server.watch_stubs(on_death), killer


if __name__ == "__main__":
    sys.exit(main())
