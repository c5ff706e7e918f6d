"""The tritonserver command line: one process per MPI rank, ports, shm labels, worker models."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from pathlib import Path

from mgm_ref.constants import MAX_HTTP_REQUEST_BYTES
from triton_models.launcher.errors import ServerError
from triton_models.launcher.install import ServerInstall

# Models that every MPI rank loads; everything else runs on rank 0 only (tensorrtllm_backend).
DEFAULT_WORKER_MODELS = ("tensorrt_llm",)
# Per python-model instance; large tensors (image embeddings) grow it in steps of this size.
DEFAULT_SHM_BYTES = 4 * 1024 * 1024
# Triton's API groups (restricted_features.h) that control the server rather than ask it for answers:
# registering shared memory (the python backend's own IPC regions included), loading and unloading
# models, log and trace settings, and model configs (which carry filesystem paths). Health, metadata,
# inference and statistics stay open.
ADMIN_APIS = ("shared-memory", "model-repository", "logging", "trace", "model-config")
# The header that unlocks them. gRPC clients send it as metadata `triton-grpc-protocol-<name>`
# (Triton prefixes gRPC restriction keys; the HTTP key is taken as given).
ADMIN_HEADER = "mgm-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# How a child (the OpenAI sidecar) gets the key: in its environment, not on a command line others can read
ADMIN_KEY_ENV = "MGM_TRITON_ADMIN_KEY"
# Optional key for HTTP inference (mgm-serve --restrict_http_inference). Triton checks neither Origin
# nor Content-Type, so any web page can POST text/plain to a loopback `generate`; a request with a
# custom header needs a CORS preflight, which Triton never grants, so browsers cannot send this one.
INFERENCE_HEADER = "mgm-inference-key"
INFERENCE_KEY_ENV = "MGM_HTTP_INFERENCE_KEY"  # where mgm-serve and MGMClient read the key


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
    # Restricted to holders of `admin_key`; () leaves every API open (mgm-serve --allow_admin_api).
    restricted_apis: tuple[str, ...] = ADMIN_APIS
    admin_key: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))
    http_inference_key: str | None = None  # None: HTTP inference is open (gRPC always is)
    # Explicit model control (all models loaded at start) lets the launcher unload the entry models
    # first when it stops the server (drain.py); Triton refuses repository loads/unloads otherwise.
    explicit_model_control: bool = True
    extra_args: tuple[str, ...] = ()


def shm_base(options: ServerOptions) -> str:
    """The start of every python-backend shm region name this server's ranks create."""
    return options.shm_prefix or f"mgm{os.getpid()}p{options.http_port}"


def _shm_prefix(options: ServerOptions, rank: int) -> str:
    # Triton 2.51 appends a UUID to each stub's region name, so this only labels /dev/shm
    # entries by launcher, port and rank; upstream gives each MPI rank `prefix{rank}_`.
    return f"{shm_base(options)}prefix{rank}_"


def explicit_control(options: ServerOptions) -> bool:
    """Whether rank 0 runs in explicit model-control mode (not when extra_args pick a mode)."""
    chosen = any(arg.startswith("--model-control-mode") for arg in options.extra_args)
    return options.explicit_model_control and not chosen


def restriction_args(options: ServerOptions) -> list[str]:
    """`--http-restricted-api` / `--grpc-restricted-protocol` for the admin groups, and HTTP inference
    when it has a key (2.51 syntax: `<api>,<api>,...:<header>=<value>`, one flag per group; there is
    no `--grpc-restricted-api`)."""
    args = []
    if options.restricted_apis:
        group = f"{','.join(options.restricted_apis)}:{ADMIN_HEADER}={options.admin_key}"
        args += [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]
    if options.http_inference_key:
        args.append(f"--http-restricted-api=inference:{INFERENCE_HEADER}={options.http_inference_key}")
    return args


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
        *restriction_args(options),
    ]
    if "--http-max-input-size" in install.flags:  # Triton >= 2.59: HTTP bodies over it are refused unread
        args.append(f"--http-max-input-size={MAX_HTTP_REQUEST_BYTES}")
    if install.backend_dir is not None:
        args.append(f"--backend-directory={install.backend_dir}")
    if install.cache_dir is not None:
        args.append(f"--cache-directory={install.cache_dir}")
    if rank == 0 and options.log_verbose:
        args.append(f"--log-verbose={options.log_verbose}")
    if rank == 0 and explicit_control(options):
        args += ["--model-control-mode=explicit", "--load-model=*"]
    if rank != 0:
        # Worker ranks load only the LLM (python models run on rank 0) and serve no endpoints:
        # upstream gives them rank 0's ports and relies on them never finishing start-up.
        args.append("--model-control-mode=explicit")
        args.extend(f"--load-model={name}" for name in options.worker_models)
        args += ["--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"]
    args.extend(options.extra_args)
    return args


def mpirun_command(
    install: ServerInstall, options: ServerOptions, world_size: int, mpirun: str = "mpirun"
) -> list[str]:
    """`mpirun --allow-run-as-root -n 1 tritonserver ... : -n 1 tritonserver ...` (one per rank)."""
    cmd = [mpirun, "--allow-run-as-root"]
    for rank in range(world_size):
        if rank:
            cmd.append(":")
        cmd += ["-n", "1", *tritonserver_args(install, options, rank)]
    return cmd


def server_command(install: ServerInstall, options: ServerOptions, world_size: int = 1) -> list[str]:
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
