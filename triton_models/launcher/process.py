"""Supervising a tritonserver child process: ports, readiness, output, signals, clean stop.

Over 400 lines: one class owns the child's whole life (ports, start, readiness, drain, stop).

model.py files run in the python backend stub, which uses this venv's site-packages (its .pth
files included) but ignores PYTHONPATH: project code must be installed (`pip install -e .`).

    with TritonServer("repo") as server:       # free loopback ports, waits for readiness
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import collections
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from triton_models.launcher import drain, shm
from triton_models.launcher.argv import (
    ADMIN_HEADER,
    GRPC_ADMIN_HEADER,
    ServerOptions,
    explicit_control,
    server_command,
    shm_base,
)
from triton_models.launcher.errors import ServerError
from triton_models.launcher.install import ServerInstall, find_server
from triton_models.launcher.supervise import Stub, StubWatch

_LOG_TAIL_LINES = 40
# Triton logs this on SIGTERM once no inference is in flight (server.cc, InferenceServer::Stop).
_NOTHING_IN_FLIGHT = "All models are stopped, unloading models"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it; a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on `port` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _is_error_line(line: str) -> bool:
    # Triton's glog errors look like "E1125 14:16:24.859557 ..."; fatal ones start "error:".
    return (len(line) > 5 and line[0] == "E" and line[1:5].isdigit()) or line.startswith("error:")


_PR_SET_PDEATHSIG = 1


def _parent_death_signal(sig: int):
    """A preexec_fn making the child get `sig` when its parent thread dies (Linux prctl).

    Stops an orphaned server from holding its ports after a crashed or SIGKILLed launcher.
    The libc function is looked up here, in the parent, so the child only makes one call.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)

    return set_signal


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


class TritonServer:
    """A tritonserver child process: start, wait for readiness, stop without leftovers.

    Ports left as None are picked free on loopback. `http_url`/`grpc_url` are `host:port`, the
    form tritonclient expects. The server and its python stubs run in their own process group,
    which stop() empties. Output is kept (last lines) in `log`, and echoed when `echo` is set.
    With `die_with_parent` (default) the server gets SIGTERM when the thread that started it
    exits: start it from a thread that outlives it (the main thread, a pytest fixture).
    Triton's admin APIs (argv.ADMIN_APIS) answer only requests carrying `admin_headers` (HTTP) or
    `grpc_admin_headers`, unless `allow_admin_api`. Its python-backend shm regions are made
    owner-only once it is ready and removed when it has stopped.
    """

    def __init__(
        self,
        model_repo: str | os.PathLike,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        *,
        host: str = "127.0.0.1",
        world_size: int = 1,
        log_verbose: int = 0,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        echo: bool = False,
        die_with_parent: bool = True,
        install: ServerInstall | None = None,
        allow_admin_api: bool = False,
        http_inference_key: str | None = None,
    ):
        self.model_repo = Path(model_repo).resolve()
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self.host = host
        self.world_size = world_size
        self.log_verbose = log_verbose
        self.extra_env = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.echo = echo
        self.die_with_parent = die_with_parent and sys.platform == "linux"
        self._install = install
        self.allow_admin_api = allow_admin_api
        self.http_inference_key = http_inference_key
        self.shm_removed = 0  # regions left behind by the last run, removed by stop()
        self.options: ServerOptions | None = None
        self._proc = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=20000)

    # -- properties
    @property
    def http_url(self) -> str:
        return f"{_connect_host(self.host)}:{self._opts().http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.host)}:{self._opts().grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self._opts().metrics_port}/metrics"

    @property
    def ports(self) -> tuple[int, int, int]:
        opts = self._opts()
        return opts.http_port, opts.grpc_port, opts.metrics_port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that unlock the restricted admin APIs (tritonclient.http `headers=`)."""
        return {ADMIN_HEADER: self._opts().admin_key}

    @property
    def admin_key(self) -> str | None:
        """The key of the restricted admin APIs (None when they are open)."""
        return None if self.allow_admin_api else self._opts().admin_key

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """The same for tritonclient.grpc (Triton expects its gRPC restriction-key prefix)."""
        return {GRPC_ADMIN_HEADER: self._opts().admin_key}

    @property
    def shm_prefix(self) -> str:
        """The name prefix of every /dev/shm region this server's python backend creates."""
        return f"{shm_base(self._opts())}prefix"

    @property
    def log(self) -> str:
        return "".join(list(self._lines))

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Error lines first (they scroll away behind the status tables), then the last lines."""
        text = [ln for ln in self._lines if not ln.startswith(("+-", "| "))]
        errors = [ln for ln in text if _is_error_line(ln)][-lines:]
        tail = "".join(text[-lines:])
        return f"errors:\n{''.join(errors)}last lines:\n{tail}" if errors else tail

    def _opts(self) -> ServerOptions:
        if self.options is None:
            raise ServerError("the server has not been started")
        return self.options

    # -- lifecycle
    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout: float = 120.0, attempts: int = 3) -> TritonServer:
        """Launch and wait until /v2/health/ready; retries on a lost race for free ports."""
        if not self.model_repo.is_dir():
            raise ServerError(f"model repository {self.model_repo} is not a directory")
        if self._proc is not None and not self._exited_unreaped(0):
            raise ServerError(f"this server is already running (pid {self._proc.pid})")
        install = self._install or find_server()
        auto_ports = None in self._requested_ports
        for attempt in range(1, attempts + 1):
            self._lines.clear()
            self._launch(install)
            try:
                return self.wait_ready(timeout)
            except ServerError:
                lost_race = auto_ports and "address already in use" in self.log.lower()
                if not lost_race or attempt == attempts:
                    raise
        raise ValueError(f"attempts must be >= 1, got {attempts}")

    def _pick_ports(self) -> tuple[int, int, int]:
        taken = {p for p in self._requested_ports if p}
        picked = []
        for requested in self._requested_ports:
            port = requested
            while not port:
                port = free_port(_connect_host(self.host))
                if port in taken:  # the OS may hand out a just-closed port again
                    port = None
            taken.add(port)
            picked.append(port)
        return tuple(picked)

    def _launch(self, install: ServerInstall) -> None:
        http_port, grpc_port, metrics_port = self._pick_ports()
        self.options = ServerOptions(
            model_repo=self.model_repo,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            host=self.host,
            log_verbose=self.log_verbose,
            extra_args=self.extra_args,
            http_inference_key=self.http_inference_key,
        )
        if self.allow_admin_api:
            self.options.restricted_apis = ()
        cmd = server_command(install, self.options, self.world_size)
        env = {**os.environ, **install.env, **self.extra_env}
        # Own session: Ctrl-C in a terminal reaches only us (we forward it), and stop() can
        # kill the whole group, python stubs included.
        preexec = _parent_death_signal(signal.SIGTERM) if self.die_with_parent else None
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self._reader = threading.Thread(
            target=self._pump_output, args=(self._proc.stdout,), name="tritonserver-log", daemon=True
        )
        self._reader.start()

    def _pump_output(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self._lines.append(line)
            if self.echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        stream.close()

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (OSError, http.client.HTTPException):  # refused, reset, 400 "not ready", timeout
            return False

    def _endpoints_listening(self) -> bool:
        # HTTP turns ready before the metrics endpoint binds; callers expect all three up.
        ports = [self._opts().grpc_port]
        if "--allow-metrics=false" not in self.extra_args:
            ports.append(self._opts().metrics_port)
        for port in ports:
            try:
                socket.create_connection((_connect_host(self.host), port), timeout=1).close()
            except OSError:
                return False
        return True

    def wait_ready(self, timeout: float = 120.0) -> TritonServer:
        """Poll readiness; on death or timeout, stop and raise with the end of the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._exited_unreaped(0):
                code = self.stop()
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready "
                    f"(model repository {self.model_repo}). Server log:\n{self.log_tail()}"
                )
            if self.is_ready() and self._endpoints_listening():
                shm.make_private(self.shm_prefix)
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerError(
            f"tritonserver was not ready after {timeout:.0f} s "
            f"(model repository {self.model_repo}). Server log:\n{self.log_tail()}"
        )

    def watch_stubs(self, on_death: Callable[[Stub], None], interval: float = 0.2) -> StubWatch:
        """Start watching the python-backend stubs (call once ready); stop() the watch before
        stopping the server. Each tick also narrows new shm regions to the owner."""
        prefix = self.shm_prefix
        return StubWatch(self._proc.pid, on_death, interval, on_tick=lambda: shm.make_private(prefix)).start()

    def send_signal(self, sig: int) -> None:
        # Not Popen.send_signal: it reaps an exited server, and stop() needs the zombie kept.
        if self._proc is not None and not self._exited_unreaped(0):
            os.kill(self._proc.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the server to exit by itself, then clean up its group; its exit code."""
        if timeout is None:
            os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT)  # keeps the zombie
        elif not self._exited_unreaped(timeout):
            raise subprocess.TimeoutExpired(self._proc.args, timeout)
        return self.stop()

    def shutdown(self, drain_timeout: float, teardown_s: float = 5.0) -> tuple[int | None, list[str]]:
        """Drain, then stop: returns the exit code and what was cut ([] when nothing was).

        Unloads the entry models and waits up to `drain_timeout` s for their requests; then SIGTERM,
        on which Triton refuses new work and waits for what is left in flight. Once it has reported
        none left, unloading is teardown only (python stubs exiting, several seconds each on a
        loaded host): it gets `teardown_s`, then the group is killed and the server counts as
        stopped cleanly (exit code 0)."""
        if self._proc is None or self.exited():
            return self.stop(), []
        cut: list[str] = []
        if explicit_control(self._opts()):
            try:
                cut = drain.drain_server(self.http_url, self.admin_headers, self.model_repo, drain_timeout)
            except ServerError as exc:
                cut = [str(exc)]
        self.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._opts().exit_timeout_s + 5
        while not self.exited() and not self._log_has(_NOTHING_IN_FLIGHT) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not self._log_has(_NOTHING_IN_FLIGHT):
            return self.stop(timeout=0.0 if self.exited() else 10.0), [*cut, "requests still in flight"]
        if self._exited_unreaped(teardown_s):
            return self.stop(), cut
        self.kill()
        self.stop(timeout=10.0)
        return 0, cut

    def _log_has(self, text: str) -> bool:
        return any(text in line for line in list(self._lines)[-200:])

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (graceful unload), SIGKILL after `timeout`; returns the server's exit code."""
        if self._proc is None:
            return None
        if timeout is None:
            timeout = self._opts().exit_timeout_s + 10
        self.send_signal(signal.SIGTERM)
        if not self._exited_unreaped(timeout):
            self._killpg(signal.SIGKILL)
            self._exited_unreaped(10)
        # The leader is a zombie until reaped, so its pid (= the group id) cannot be reused yet:
        # killing the group now hits only our own leftovers (stubs, MPI ranks).
        self._killpg(signal.SIGKILL)
        code = self._proc.wait()
        self._wait_group_gone(5)
        self._finish_reader()
        if not self.group_alive():  # nothing of ours can still map them
            self.shm_removed += shm.remove(self.shm_prefix)
        return code

    def _exited_unreaped(self, timeout: float) -> bool:
        """Wait up to `timeout` for the leader to exit without reaping it (WNOWAIT)."""
        if self._proc.returncode is not None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def exited(self) -> bool:
        """True once the server process has exited (reaped or not)."""
        return self._proc is not None and self._exited_unreaped(0)

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once (no graceful unload)."""
        if self._proc is not None:
            self._killpg(signal.SIGKILL)

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        """True while any process of the server's group (server, stubs, ranks) exists."""
        if self._proc is None:
            return False
        try:
            os.killpg(self._proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _wait_group_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _finish_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
