"""`mgm-serve`: run a Triton Inference Server on a model repository.

Uses `tritonserver` from PATH when there is one (the NGC `tritonserver:<yy.mm>-trtllm-python-py3`
image). Otherwise it runs the server shipped in the `nvidia-pytriton` wheel (Triton 2.51, python
backend only, works on CPU): that binary only runs from a writable copy of its tree with the
right libraries on LD_LIBRARY_PATH, which `wheel_server()` prepares once per cache directory.

model.py files run in the python backend stub, which uses this venv's site-packages (its .pth
files included) but ignores PYTHONPATH: project code must be installed (`pip install -e .`).

    mgm-serve --model_repo triton_models/repo --http_port 8000
    with TritonServer("repo") as server:       # free loopback ports, waits for readiness
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import http.client
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

from mgm_ref.errors import MGMError

# Models that every MPI rank loads; everything else runs on rank 0 only (tensorrtllm_backend).
DEFAULT_WORKER_MODELS = ("tensorrt_llm",)
# Per python-model instance; large tensors (image embeddings) grow it in steps of this size.
DEFAULT_SHM_BYTES = 4 * 1024 * 1024
_TREE_STAMP = ".mgm-complete"
_LOG_TAIL_LINES = 40


class ServerError(MGMError, RuntimeError):
    """The server could not be found, set up, started or made ready."""


# --------------------------------------------------------------------------- locating the binary


@dataclasses.dataclass(frozen=True)
class ServerInstall:
    """A runnable tritonserver: the binary, where its backends live and the env it needs."""

    binary: Path
    backend_dir: Path | None = None  # None: the server's built-in default (/opt/tritonserver/...)
    cache_dir: Path | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # overrides for os.environ


def cache_root() -> Path:
    """Where mgm-deploy keeps generated, reusable files (server tree, perf_analyzer libs)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mgm-deploy"


def pytriton_root() -> Path:
    """`site-packages/pytriton` of the running interpreter; ServerError when not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServerError(
            "no `tritonserver` on PATH and the nvidia-pytriton wheel is not installed: "
            "run inside the NGC tritonserver image or `pip install 'mgm-deploy[serve]'`"
        )
    return Path(spec.origin).parent


def pytriton_libs_dir() -> Path:
    """The wheel's bundled shared libraries (libtritonserver, libb64, libcudart, ...)."""
    return pytriton_root().parent / "nvidia_pytriton.libs"


def bundled_libs_dir() -> Path | None:
    """nvidia-pytriton's bundled shared libraries, None without the wheel (for client tools: perf_analyzer)."""
    return pytriton_libs_dir() if importlib.util.find_spec("pytriton") else None


def default_server_home() -> Path:
    """`$MGM_TRITON_HOME`, or a per-version, per-Python-minor directory in the cache."""
    if os.environ.get("MGM_TRITON_HOME"):
        return Path(os.environ["MGM_TRITON_HOME"]).expanduser()
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache_root() / f"tritonserver-{version}-py{py}"


def _populate_tree(src: Path, dest: Path) -> None:
    """Copy the server and the python backend stub that matches this interpreter into `dest`."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (src / "python_backend_stubs").iterdir())
        raise ServerError(
            f"nvidia-pytriton has no python backend stub for Python {py} (it has {have})")
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("bin", "backends", "caches"):
        shutil.copytree(src / name, dest / name, ignore=ignore)
    shutil.copy2(stub, dest / "backends" / "python" / stub.name)


def ensure_server_tree(src: Path, dest: Path) -> Path:
    """Make the writable server tree at `dest` once; safe when several processes race.

    The tree is built in a sibling temp dir and renamed into place, so `dest` is either
    absent or complete; the loser of a race discards its copy.
    """
    if (dest / _TREE_STAMP).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _populate_tree(src, tmp)
        (tmp / _TREE_STAMP).write_text(f"copied from {src}\n")
        try:
            os.rename(tmp, dest)  # atomic; also replaces an empty `dest` directory
        except OSError as exc:
            if not (dest / _TREE_STAMP).is_file():
                raise ServerError(f"cannot create the server tree at {dest}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _prepend_path(value: str | None, *entries: str) -> str:
    return os.pathsep.join([*entries, *([value] if value else [])])


def wheel_server(home: Path | None = None) -> ServerInstall:
    """The nvidia-pytriton server, set up to run from `home` (default: default_server_home())."""
    tree = ensure_server_tree(pytriton_root() / "tritonserver", home or default_server_home())
    # The binary's RPATH only works inside site-packages. Python's LIBDIR goes first so the stub
    # embeds the same libpython as this interpreter rather than the wheel's bundled one.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld_path = _prepend_path(os.environ.get("LD_LIBRARY_PATH"), libdir, str(pytriton_libs_dir()))
    # The stub resolves `python3` on PATH to find its site-packages; put this venv first so
    # model.py sees the same packages (numpy, torch, the project) as this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    path = _prepend_path(os.environ.get("PATH"), bin_dir)
    return ServerInstall(
        binary=tree / "bin" / "tritonserver",
        backend_dir=tree / "backends",
        cache_dir=tree / "caches",
        env={"LD_LIBRARY_PATH": ld_path, "PATH": path},
    )


def find_server() -> ServerInstall:
    """`tritonserver` from PATH (NGC image), else the nvidia-pytriton wheel's server."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerInstall(binary=Path(on_path))
    return wheel_server()


# --------------------------------------------------------------------------- command line


@dataclasses.dataclass
class ServerOptions:
    """What a tritonserver process is started with (the same for every MPI rank unless noted)."""

    model_repo: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"  # tritonserver binds 0.0.0.0 unless told otherwise
    log_verbose: int = 0
    shm_default_byte_size: int = DEFAULT_SHM_BYTES
    exit_timeout_s: int = 15  # Triton's default 30 s is mostly spent waiting on stuck streams
    shm_prefix: str = ""  # python backend shm region label; "" = launcher pid + http port
    worker_models: tuple[str, ...] = DEFAULT_WORKER_MODELS
    extra_args: tuple[str, ...] = ()


def _shm_prefix(options: ServerOptions, rank: int) -> str:
    # Triton 2.51 appends a UUID to each stub's region name, so this only labels /dev/shm
    # entries by launcher, port and rank; upstream gives each MPI rank `prefix{rank}_`.
    base = options.shm_prefix or f"mgm{os.getpid()}p{options.http_port}"
    return f"{base}prefix{rank}_"


def tritonserver_args(install: ServerInstall, options: ServerOptions, rank: int = 0) -> list[str]:
    """Arguments for one tritonserver process (rank 0 serves; other ranks only run the LLM)."""
    args = [
        str(install.binary),
        f"--model-repository={options.model_repo}",
        f"--http-address={options.host}",
        f"--grpc-address={options.host}",
        f"--metrics-address={options.host}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        "--disable-auto-complete-config",
        f"--exit-timeout-secs={options.exit_timeout_s}",
        f"--backend-config=python,shm-default-byte-size={options.shm_default_byte_size}",
        f"--backend-config=python,shm-region-prefix-name={_shm_prefix(options, rank)}",
    ]
    if install.backend_dir is not None:
        args.append(f"--backend-directory={install.backend_dir}")
    if install.cache_dir is not None:
        args.append(f"--cache-directory={install.cache_dir}")
    if rank == 0 and options.log_verbose:
        args.append(f"--log-verbose={options.log_verbose}")
    if rank != 0:
        # Worker ranks load only the LLM (python models run on rank 0) and serve no endpoints:
        # upstream gives them rank 0's ports and relies on them never finishing start-up.
        args.append("--model-control-mode=explicit")
        args.extend(f"--load-model={name}" for name in options.worker_models)
        args += ["--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"]
    args.extend(options.extra_args)
    return args


def mpirun_command(install: ServerInstall, options: ServerOptions, world_size: int,
                   mpirun: str = "mpirun") -> list[str]:
    """`mpirun --allow-run-as-root -n 1 tritonserver ... : -n 1 tritonserver ...` (one per rank)."""
    cmd = [mpirun, "--allow-run-as-root"]
    for rank in range(world_size):
        if rank:
            cmd.append(":")
        cmd += ["-n", "1", *tritonserver_args(install, options, rank)]
    return cmd


def server_command(install: ServerInstall, options: ServerOptions,
                   world_size: int = 1) -> list[str]:
    """The full command line; world_size > 1 needs Open MPI's `mpirun` on PATH."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size == 1:
        return tritonserver_args(install, options)
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise ServerError(
            f"--world_size {world_size} launches one tritonserver per rank with `mpirun`, which is "
            "not on PATH: run inside the NGC tritonserver trtllm image or install Open MPI"
        )
    return mpirun_command(install, options, world_size, mpirun)


# --------------------------------------------------------------------------- process management


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
    """

    def __init__(self, model_repo: str | os.PathLike, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, *,
                 host: str = "127.0.0.1", world_size: int = 1, log_verbose: int = 0,
                 env: dict[str, str] | None = None, extra_args: Sequence[str] = (),
                 echo: bool = False, die_with_parent: bool = True,
                 install: ServerInstall | None = None):
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
    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout: float = 120.0, attempts: int = 3) -> "TritonServer":
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
            model_repo=self.model_repo, http_port=http_port, grpc_port=grpc_port,
            metrics_port=metrics_port, host=self.host, log_verbose=self.log_verbose,
            extra_args=self.extra_args)
        cmd = server_command(install, self.options, self.world_size)
        env = {**os.environ, **install.env, **self.extra_env}
        # Own session: Ctrl-C in a terminal reaches only us (we forward it), and stop() can
        # kill the whole group, python stubs included.
        preexec = _parent_death_signal(signal.SIGTERM) if self.die_with_parent else None
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                      preexec_fn=preexec)
        self._reader = threading.Thread(target=self._pump_output, args=(self._proc.stdout,),
                                        name="tritonserver-log", daemon=True)
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

    def wait_ready(self, timeout: float = 120.0) -> "TritonServer":
        """Poll readiness; on death or timeout, stop and raise with the end of the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._exited_unreaped(0):
                code = self.stop()
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready "
                    f"(model repository {self.model_repo}). Server log:\n{self.log_tail()}")
            if self.is_ready() and self._endpoints_listening():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s "
                          f"(model repository {self.model_repo}). Server log:\n{self.log_tail()}")

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


# --------------------------------------------------------------------------- CLI


def add_server_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_repo", required=True, type=Path, help="Triton model repository")
    parser.add_argument("--http_port", type=int, default=8000)
    parser.add_argument("--grpc_port", type=int, default=8001)
    parser.add_argument("--metrics_port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address for all endpoints (0.0.0.0 to serve other hosts)")
    parser.add_argument("--world_size", type=int, default=1,
                        help="tensor-parallel ranks: one tritonserver per rank under mpirun")
    parser.add_argument("--log_verbose", type=int, default=0, help="tritonserver --log-verbose")
    parser.add_argument("--ready_timeout", type=float, default=300.0,
                        help="seconds to wait for /v2/health/ready (engine loading can be slow)")
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
            print(f"mgm-serve: {signal.Signals(signum).name}, shutting the server down",
                  file=sys.stderr, flush=True)
            server.send_signal(signal.SIGTERM)
        else:
            server.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return received


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgm-serve",
                                     description="Run Triton on a model repository.")
    args = add_server_arguments(parser).parse_args(argv)
    server = TritonServer(args.model_repo, args.http_port, args.grpc_port, args.metrics_port,
                          host=args.host, world_size=args.world_size, log_verbose=args.log_verbose,
                          echo=True)
    received = _forward_signals(server)
    try:
        server.start(timeout=args.ready_timeout)
    except ServerError as exc:
        server.stop()
        if received:  # asked to stop while loading: not an error worth a log dump
            return _exit_code(server.returncode)
        print(f"mgm-serve: {exc}", file=sys.stderr)
        return _exit_code(server.returncode) or 1
    print(f"mgm-serve: ready: HTTP {server.http_url}, gRPC {server.grpc_url}, "
          f"metrics {server.metrics_url}", file=sys.stderr, flush=True)
    return _exit_code(server.wait())


if __name__ == "__main__":
    sys.exit(main())
