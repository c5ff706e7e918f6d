"""Serving infrastructure: config templating, the mgm-serve launcher and perf_analyzer.

The `server` tests start the real tritonserver (nvidia-pytriton wheel on CPU, or the NGC one) on a
toy model repository written here, so they check the launcher independently of MGM.

Over 400 lines: the launcher's tests share one toy repository and its server.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mgm_ref.constants import MAX_HTTP_REQUEST_BYTES
from triton_models.fill_template import fill_template, parse_substitutions
from triton_models.fill_template import main as fill_template_main
from triton_models.launcher import argv, install, process
from triton_models.launcher.errors import ServerError

# --------------------------------------------------------------------------- toy model repository

ADD_ONE_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# Slow enough (20 ms a batch) that concurrent requests queue up and get batched together.
ADD_ONE_MODEL = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.02)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
"""

STREAM3_CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# Streams IN+1, IN+2, IN+3; the last response carries FINAL (no extra empty response).
STREAM3_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            for k in (1, 2, 3):
                out = pb_utils.Tensor("OUT", (x + k).astype(np.int32))
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if k == 3 else 0
                sender.send(pb_utils.InferenceResponse([out]), flags=flags)
        return None
"""

BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("toy model refuses to load")
"""


def write_model(repo: Path, name: str, config: str, model_py: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py))


def require_server() -> None:
    try:
        install.find_server()
    except ServerError as exc:
        pytest.skip(f"no runnable tritonserver: {exc}")


# --------------------------------------------------------------------------- fill_template


def test_fill_template_substitutes_every_placeholder():
    text = 'batch: ${triton_max_batch_size}\ndecoupled: ${decoupled_mode}\npath: "${engine_dir}"'
    values = {"triton_max_batch_size": 8, "decoupled_mode": True, "engine_dir": "/e"}
    out = fill_template(text, values)
    assert out == 'batch: 8\ndecoupled: true\npath: "/e"'


def test_fill_template_rejects_unknown_key():
    with pytest.raises(ValueError, match=r"no placeholder for \['max_batch'\]"):
        fill_template("max_batch_size: ${max_batch_size}", {"max_batch_size": 1, "max_batch": 2})


def test_fill_template_rejects_leftover_placeholder_unless_partial():
    text = "a: ${a}\nb: ${b}"
    with pytest.raises(ValueError, match=r"unfilled: \['\$\{b\}'\]"):
        fill_template(text, {"a": 1})
    assert fill_template(text, {"a": 1}, partial=True) == "a: 1\nb: ${b}"
    with pytest.raises(ValueError, match="unfilled"):  # malformed placeholders are caught too
        fill_template("x: ${not valid}", {})


def test_parse_substitutions_comma_escape_and_colons():
    values = parse_substitutions(r"ids:0\,1\,2,dir:/a:b,empty:")
    assert values == {"ids": "0,1,2", "dir": "/a:b", "empty": ""}
    with pytest.raises(ValueError, match="key:value"):
        parse_substitutions("novalue")


def test_fill_template_cli_in_place(tmp_path, capsys):
    cfg = tmp_path / "config.pbtxt"
    cfg.write_text('gpu_device_ids: "${ids}"\nbatch: ${bs}\n')
    assert fill_template_main(["-i", str(cfg), r"ids:0\,1,bs:4"]) == 0
    assert cfg.read_text() == 'gpu_device_ids: "0,1"\nbatch: 4\n'
    assert fill_template_main([str(cfg), "bs:4"]) == 2  # already filled: `bs` is unknown now
    assert "no placeholder" in capsys.readouterr().err


# --------------------------------------------------------------------------- launcher, no server


def fake_install(tmp_path: Path) -> install.ServerInstall:
    return install.ServerInstall(
        binary=tmp_path / "bin" / "tritonserver", backend_dir=tmp_path / "backends", cache_dir=tmp_path / "caches"
    )


def test_mpirun_command_one_server_per_rank(tmp_path):
    install = fake_install(tmp_path)
    opts = argv.ServerOptions(
        model_repo=Path("/repo"), shm_prefix="t", worker_models=("tensorrt_llm", "multimodal_encoders")
    )
    cmd = argv.mpirun_command(install, opts, world_size=3)
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(cmd[2:]).split(" : ")
    assert len(ranks) == 3
    for rank, args in enumerate(ranks):
        args = args.split()
        assert args[:3] == ["-n", "1", str(install.binary)]
        assert "--model-repository=/repo" in args
        assert "--disable-auto-complete-config" in args
        assert f"--backend-config=python,shm-region-prefix-name=tprefix{rank}_" in args
        assert f"--backend-directory={install.backend_dir}" in args
        worker_flags = {
            "--model-control-mode=explicit",
            "--load-model=tensorrt_llm",
            "--load-model=multimodal_encoders",
            "--allow-http=false",
        }
        if rank == 0:
            assert "--http-port=8000" in args and "--http-address=127.0.0.1" in args
            # explicit model control so that mgm-serve can drain the entry models first; all load
            assert "--model-control-mode=explicit" in args and "--load-model=*" in args
            assert not (worker_flags - {"--model-control-mode=explicit"}) & set(args)
        else:
            assert worker_flags <= set(args)


def test_world_size_needs_mpirun(tmp_path, monkeypatch):
    monkeypatch.setattr(argv.shutil, "which", lambda name: None)
    opts = argv.ServerOptions(model_repo=tmp_path)
    with pytest.raises(ServerError, match="mpirun"):
        argv.server_command(fake_install(tmp_path), opts, world_size=2)
    single = argv.server_command(fake_install(tmp_path), opts, world_size=1)
    assert single[0].endswith("tritonserver")


def test_explicit_ports_are_kept_and_free_ones_are_distinct(tmp_path):
    server = process.TritonServer(tmp_path, 18000, None, None)
    http, grpc, metrics = server._pick_ports()
    assert http == 18000 and len({http, grpc, metrics}) == 3


def test_server_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MGM_TRITON_HOME", str(tmp_path / "tree"))
    assert install.default_server_home() == tmp_path / "tree"
    monkeypatch.delenv("MGM_TRITON_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert install.default_server_home().parent == tmp_path / "mgm-deploy"


def test_server_tree_is_built_once_and_tolerates_a_race(tmp_path, monkeypatch):
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = tmp_path / "src"
    for rel in (
        "bin/tritonserver",
        "backends/python/libtriton_python.so",
        "caches/local/libtritoncache_local.so",
        f"python_backend_stubs/{py}/triton_python_backend_stub",
    ):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    dest = install.ensure_server_tree(src, tmp_path / "home" / "tree")
    assert (dest / "backends/python/triton_python_backend_stub").read_text().endswith("stub")
    (src / "bin/tritonserver").write_text("changed")
    assert install.ensure_server_tree(src, dest) == dest  # reused, not rebuilt
    assert (dest / "bin/tritonserver").read_text() == "bin/tritonserver"
    # Another process finishes first while we copy: our rename loses, its tree is used.
    racer = tmp_path / "home" / "raced"
    populate = install._populate_tree

    def populate_while_other_process_wins(src_dir, tmp_dir):
        populate(src_dir, tmp_dir)
        monkeypatch.setattr(install, "_populate_tree", populate)
        install.ensure_server_tree(src_dir, racer)

    monkeypatch.setattr(install, "_populate_tree", populate_while_other_process_wins)
    assert install.ensure_server_tree(src, racer) == racer
    assert (racer / ".mgm-complete").is_file()
    # An incomplete directory in the way is reported, not silently used.
    (racer / ".mgm-complete").unlink()
    with pytest.raises(ServerError, match="cannot create"):
        install.ensure_server_tree(src, racer)
    assert [p.name for p in (tmp_path / "home").iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    require_server()
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    write_model(repo, "stream3", STREAM3_CONFIG, STREAM3_MODEL)
    with process.TritonServer(repo) as server:
        yield server


@pytest.mark.server
def test_http_infer_uses_dynamic_batching(toy_server):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(toy_server.http_url, concurrency=4)
    pending = []
    for i in range(4):
        x = np.full((1, 3), i, dtype=np.float32)
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        pending.append((x, client.async_infer("add_one", [inp])))
    for x, request in pending:
        np.testing.assert_array_equal(request.get_result().as_numpy("OUTPUT0"), x + 1)
    stats = client.get_inference_statistics("add_one")["model_stats"][0]
    assert stats["inference_count"] >= 4
    assert stats["execution_count"] < stats["inference_count"]  # some requests shared a batch
    client.close()


@pytest.mark.server
def test_grpc_infer(toy_server):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(toy_server.grpc_url)
    assert client.is_model_ready("add_one")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("add_one", [inp]).as_numpy("OUTPUT0"), x + 1)
    client.close()


@pytest.mark.server
def test_grpc_stream_three_responses(toy_server):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(toy_server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    inp = grpcclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([10], dtype=np.int32))
    client.async_stream_infer("stream3", [inp], enable_empty_final_response=True)
    outputs = []
    while True:
        result, error = results.get(timeout=10)
        assert error is None, error
        response = result.get_response()
        if response.outputs:
            outputs.append(int(result.as_numpy("OUT")[0]))
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    assert outputs == [11, 12, 13]


@pytest.mark.server
def test_http_generate_stream_sse(toy_server):
    url = f"http://{toy_server.http_url}/v2/models/stream3/generate_stream"
    request = urllib.request.Request(
        url, data=json.dumps({"IN": 5}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [
            json.loads(line[len("data:") :])
            for line in response.read().decode().splitlines()
            if line.startswith("data:")
        ]
    assert [event["OUT"] for event in events] == [6, 7, 8]


@pytest.mark.server
def test_perf_analyzer_smoke(toy_server):
    from client import perf

    try:
        perf.find_perf_analyzer()
    except perf.PerfAnalyzerError as exc:
        pytest.skip(str(exc))
    result = perf.run_perf_analyzer(
        [
            "-m",
            "add_one",
            "-u",
            toy_server.http_url,
            "-i",
            "http",
            "--shape",
            "INPUT0:4",
            "--concurrency-range",
            "1:2",
            "--measurement-interval",
            "500",
            "--stability-percentage",
            "999",
            "--max-trials",
            "3",
            "-H",  # perf_analyzer reads the model config, an admin API
            "{}:{}".format(*next(iter(toy_server.admin_headers.items()))),
        ],
        timeout=60,
    )
    rows = perf.parse_summary(result.stdout)
    assert [row.concurrency for row in rows] == [1, 2]
    assert all(row.throughput > 0 and row.latency_us > 0 for row in rows)


@pytest.mark.server
def test_stop_leaves_no_process_and_no_port(tmp_path):
    require_server()
    write_model(tmp_path, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    server = process.TritonServer(tmp_path).start()
    ports = server.ports
    assert len(set(ports)) == 3 and not any(process.port_is_free(p) for p in ports)
    assert server.group_alive()
    assert server.stop() == 0
    assert not server.group_alive()  # server and python stubs gone
    assert all(process.port_is_free(p) for p in ports)
    assert server.stop() == 0  # idempotent


@pytest.mark.server
def test_failed_model_load_reports_the_cause(tmp_path):
    require_server()
    write_model(tmp_path, "broken", ADD_ONE_CONFIG, BROKEN_MODEL)
    server = process.TritonServer(tmp_path)
    with pytest.raises(ServerError, match="exited with code 1") as info:
        server.start(timeout=60)
    assert "toy model refuses to load" in str(info.value)
    assert not server.group_alive()


def start_cli(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`python -m triton_models.launcher.cli` on the toy add_one repo, once it says it is ready."""
    write_model(tmp_path / "repo", "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    ports = [process.free_port() for _ in range(3)]
    if len(set(ports)) < 3:
        pytest.skip("the OS handed out the same free port twice")
    cmd = [
        sys.executable,
        "-m",
        "triton_models.launcher.cli",
        "--model_repo",
        str(tmp_path / "repo"),
        "--http_port",
        str(ports[0]),
        "--grpc_port",
        str(ports[1]),
        "--metrics_port",
        str(ports[2]),
        "--ready_timeout",
        "60",
    ]
    # stdout carries the server log; stderr only mgm-serve's own messages.
    cli = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    seen = []
    for line in cli.stderr:  # ends at "ready" or when mgm-serve exits (ready_timeout bounds it)
        seen.append(line)
        if line.startswith("mgm-serve: ready: HTTP 127.0.0.1:"):
            return cli, ports
    cli.wait()
    pytest.fail(f"mgm-serve exited with {cli.returncode} before ready:\n{''.join(seen)[-2000:]}")


def wait_ports_free(ports: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(process.port_is_free(p) for p in ports):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.server
def test_cli_forwards_sigint_and_exits_cleanly(tmp_path):
    require_server()
    cli, ports = start_cli(tmp_path)
    cli.send_signal(signal.SIGINT)  # the server has its own session: only a forward stops it
    try:
        _, err = cli.communicate(timeout=40)
    finally:
        cli.kill()
    assert cli.returncode == 0, err[-2000:]
    assert "SIGINT" in err
    assert all(process.port_is_free(p) for p in ports)


@pytest.mark.server
def test_server_dies_with_a_killed_launcher(tmp_path):
    require_server()
    cli, ports = start_cli(tmp_path)
    cli.kill()  # no chance to forward anything: the parent-death signal must stop the server
    cli.communicate()
    assert wait_ports_free(ports, timeout=30)


# --------------------------------------------------------------------------- admin APIs, transport limits

# Read from triton-inference-server/server at tag v2.51.0 (commit e0f0734d61c789535ac58c22b79d67eabc5d7477):
# - src/command_line_parser.cc, TritonParser::ParseRestrictedFeatureOption: the value of
#   --http-restricted-api / --grpc-restricted-protocol is split by ParseGenericConfigOption(arg, ":", "=")
#   into "<api>,<api>,...", key, value; an API may be in one group only; gRPC keys get the prefix
#   grpc::kRestrictedProtocolHeaderTemplate, "triton-grpc-protocol-" (src/grpc/grpc_server.h).
# - src/restricted_features.h: the groups are health, metadata, inference, shared-memory, model-config,
#   model-repository, statistics, trace, logging.
# - no flag bounds a request body: `--http-max-input-size` first appears in v2.59.0 (commit af8bb9302),
#   and gRPC's limit is src/common.h MAX_GRPC_MESSAGE_SIZE = INT32_MAX, set by
#   builder_.SetMaxMessageSize in src/grpc/grpc_server.cc.
# Read at tag v2.69.0 (commit 34ca83e780bff7829b33d922fa9d16a0628e050c), the newest tag stored:
# - src/command_line_parser.cc: `--http-max-input-size` (Option::ArgInt) is the "Maximum allowed HTTP
#   request input size in bytes", also bounding a compressed request's decompressed size; values <= 0
#   are refused. src/common.h: HTTP_DEFAULT_MAX_INPUT_SIZE = 1 << 26 (64 MiB).
# - gRPC still has no request-size flag: MAX_GRPC_MESSAGE_SIZE = INT32_MAX (src/common.h).
TRITON_SERVER_COMMIT = "e0f0734d61c789535ac58c22b79d67eabc5d7477"
TRITON_RESTRICTED_GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)


def test_admin_restriction_args_use_triton_2_51_syntax(tmp_path):
    opts = argv.ServerOptions(model_repo=Path("/repo"), admin_key="k3y")
    args = argv.tritonserver_args(fake_install(tmp_path), opts)
    group = "shared-memory,model-repository,logging,trace,model-config:mgm-admin-key=k3y"
    assert f"--http-restricted-api={group}" in args and f"--grpc-restricted-protocol={group}" in args
    assert set(argv.ADMIN_APIS) <= set(TRITON_RESTRICTED_GROUPS)
    assert argv.GRPC_ADMIN_HEADER == "triton-grpc-protocol-mgm-admin-key"
    opened = argv.tritonserver_args(
        fake_install(tmp_path), argv.ServerOptions(model_repo=Path("/r"), restricted_apis=())
    )
    assert not [a for a in opened if "restricted" in a]
    assert argv.ServerOptions(Path("/r")).admin_key != argv.ServerOptions(Path("/r")).admin_key  # per launch
    keyed = argv.tritonserver_args(fake_install(tmp_path), argv.ServerOptions(Path("/r"), http_inference_key="k"))
    assert "--http-restricted-api=inference:mgm-inference-key=k" in keyed
    assert not [a for a in keyed if a.startswith("--grpc-restricted-protocol=inference")]


@pytest.mark.server
def test_installed_tritonserver_flags_match_the_recorded_source():
    require_server()
    server = install.find_server()
    out = subprocess.run(
        [str(server.binary), "--help"], env={**process.os.environ, **server.env}, capture_output=True, text=True
    )
    text = out.stdout + out.stderr
    assert "--http-restricted-api" in text and "--grpc-restricted-protocol" in text
    assert "--grpc-restricted-api" not in text  # the gRPC flag has another name
    for group in TRITON_RESTRICTED_GROUPS:
        assert group in text
    assert server.flags and "--http-restricted-api" in server.flags  # what the launcher reads
    # 2.51 has no body limit; where a server lists one, the launcher sets it (next test)
    assert ("--http-max-input-size" in server.flags) == ("--http-max-input-size" in text)


def test_the_http_body_limit_is_set_where_the_server_has_the_flag(tmp_path):
    opts = argv.ServerOptions(model_repo=Path("/repo"))
    old = fake_install(tmp_path)
    assert not [a for a in argv.tritonserver_args(old, opts) if "max-input-size" in a]
    new = dataclasses.replace(old, flags=frozenset({"--http-max-input-size", "--http-restricted-api"}))
    assert f"--http-max-input-size={MAX_HTTP_REQUEST_BYTES}" in argv.tritonserver_args(new, opts)


@pytest.mark.server
def test_admin_apis_need_the_key_while_inference_and_health_stay_open(toy_server):
    import urllib.error

    base = f"http://{toy_server.http_url}"

    def status(path, data=None, headers=None):
        request = urllib.request.Request(base + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    admin = [
        ("/v2/models/add_one/config", None),
        ("/v2/repository/index", b"{}"),
        ("/v2/logging", b'{"log_verbose_level": 1}'),
        ("/v2/trace/setting", None),
        ("/v2/systemsharedmemory/region/x/register", b'{"key": "/x", "offset": 0, "byte_size": 8}'),
    ]
    for path, data in admin:
        code, body = status(path, data)
        assert code != 200 and "restricted" in body, (path, code, body)
    assert status("/v2/models/add_one/config", headers=toy_server.admin_headers)[0] == 200
    assert status("/v2/health/ready")[0] == 200 and status("/v2/models/add_one")[0] == 200
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(toy_server.grpc_url)
    with pytest.raises(Exception, match="restricted"):
        client.get_model_config("add_one")
    assert client.get_model_config("add_one", headers=toy_server.grpc_admin_headers).config.name == "add_one"
    assert client.is_server_ready()
    client.close()


def cross_origin_post(http_url: str, headers: dict | None = None) -> int:
    """The status a web page's simple (preflight-free) POST to `generate` gets."""
    import urllib.error

    request = urllib.request.Request(
        f"http://{http_url}/v2/models/stream3/generate",
        data=json.dumps({"IN": 1}).encode(),
        headers={"Content-Type": "text/plain", "Origin": "http://evil.example", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.server
def test_cross_origin_text_plain_post_reaches_generate_by_default(toy_server):
    """Triton 2.51 checks neither Origin nor Content-Type: open by default (README "Admin surface")."""
    assert cross_origin_post(toy_server.http_url) == 200


@pytest.mark.server
def test_a_keyed_http_inference_api_refuses_what_a_browser_can_send(tmp_path):
    """With an HTTP inference key (mgm-serve --restrict_http_inference) the same POST is refused; the
    header a browser cannot send cross-origin opens it; gRPC, health and metadata stay open."""
    require_server()
    write_model(tmp_path, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    write_model(tmp_path, "stream3", STREAM3_CONFIG, STREAM3_MODEL)
    with process.TritonServer(tmp_path, http_inference_key="s3cret") as server:
        assert cross_origin_post(server.http_url) == 403
        assert cross_origin_post(server.http_url, {argv.INFERENCE_HEADER: "wrong"}) == 403
        assert cross_origin_post(server.http_url, {argv.INFERENCE_HEADER: "s3cret"}) == 200
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/add_one", timeout=10) as r:
            assert r.status == 200
        grpcclient = pytest.importorskip("tritonclient.grpc")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = np.zeros((1, 3), np.float32)
        inp = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("add_one", [inp]).as_numpy("OUTPUT0"), x + 1)
        client.close()


def test_mgm_client_sends_the_http_inference_key(monkeypatch):
    from client.mgm_client import MGMClient

    monkeypatch.delenv(argv.INFERENCE_KEY_ENV, raising=False)
    assert MGMClient("h:1", "http").http_headers == {}
    monkeypatch.setenv(argv.INFERENCE_KEY_ENV, "from-env")
    assert MGMClient("h:1", "http").http_headers == {argv.INFERENCE_HEADER: "from-env"}
    assert MGMClient("h:1", "http", http_inference_key="given").http_headers == {argv.INFERENCE_HEADER: "given"}
