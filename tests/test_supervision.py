"""mgm-serve under faults: a python-backend stub killed mid-request, SIGTERM with streams in flight.

Each test starts `mgm-serve` (the CLI, as an operator runs it) on a toy repository with a slow
streaming model, so timings are the launcher's, not MGM's.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.test_server_infra import ADD_ONE_CONFIG, ADD_ONE_MODEL, require_server, write_model
from triton_models.launcher import cli, process, shm, supervise

pytestmark = pytest.mark.server

SLOW_CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "STEPS", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 2 } ]
"""

# One response every 50 ms, STEPS of them; the last one carries FINAL.
SLOW_MODEL = """
import threading
import time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            steps = int(pb_utils.get_input_tensor_by_name(request, "STEPS").as_numpy()[0])
            for k in range(steps):
                time.sleep(0.05)
                out = pb_utils.Tensor("OUT", np.array([k], np.int32))
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if k == steps - 1 else 0
                sender.send(pb_utils.InferenceResponse([out]), flags=flags)
        return None
"""


HOLD_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# The slow first step of `pipe`: Y = X after 1.5 s.
HOLD_MODEL = """
import time
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        time.sleep(1.5)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]
"""

PLUS1_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Z", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

PLUS1_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Z", pb_utils.get_input_tensor_by_name(r, "Y").as_numpy() + 1)])
            for r in requests
        ]
"""

# Two steps, like MGM's ensemble: a request in flight needs `plus1` after `hold` is done.
PIPE_CONFIG = """
platform: "ensemble"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Z", data_type: TYPE_FP32, dims: [ -1 ] } ]
ensemble_scheduling { step [
  { model_name: "hold" model_version: -1 input_map { key: "X" value: "X" } output_map { key: "Y" value: "_y" } },
  { model_name: "plus1" model_version: -1 input_map { key: "Y" value: "_y" } output_map { key: "Z" value: "Z" } }
] }
"""


def toy_repo(repo: Path) -> Path:
    write_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    write_model(repo, "slow", SLOW_CONFIG, SLOW_MODEL)
    write_model(repo, "hold", HOLD_CONFIG, HOLD_MODEL)
    write_model(repo, "plus1", PLUS1_CONFIG, PLUS1_MODEL)
    (repo / "pipe" / "1").mkdir(parents=True)
    (repo / "pipe" / "config.pbtxt").write_text(PIPE_CONFIG)
    return repo


class Served:
    """`python -m triton_models.launcher.cli` on a repository (default: the toy one), once ready."""

    def __init__(self, tmp_path: Path, *extra: str, repo: Path | None = None, ready_timeout: int = 120):
        require_server()
        self.repo = repo or toy_repo(tmp_path / "repo")
        self.ports = [process.free_port() for _ in range(3)]
        if len(set(self.ports)) < 3:
            pytest.skip("the OS handed out the same free port twice")
        cmd = [sys.executable, "-m", "triton_models.launcher.cli", "--model_repo", str(self.repo)]
        for flag, port in zip(("--http_port", "--grpc_port", "--metrics_port"), self.ports, strict=True):
            cmd += [flag, str(port)]
        self.server_log = tmp_path / "server.log"
        self.cli = subprocess.Popen(
            [*cmd, "--ready_timeout", str(ready_timeout), *extra],
            stdout=self.server_log.open("w"),
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        self.err: list[str] = []
        for line in self.cli.stderr:
            self.err.append(line)
            if line.startswith("mgm-serve: ready:"):
                break
        else:
            self.cli.wait()
            pytest.fail(f"mgm-serve exited with {self.cli.returncode} before ready:\n{''.join(self.err)[-2000:]}")
        threading.Thread(target=lambda: self.err.extend(self.cli.stderr), daemon=True).start()
        self.shm_prefix = f"mgm{self.cli.pid}p{self.ports[0]}prefix"  # argv.shm_base for this launcher

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    def ready_status(self) -> int | str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[0]}/v2/health/ready", timeout=1) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError as exc:
            return type(exc).__name__

    def stubs(self) -> list[supervise.Stub]:
        # the CLI's child is tritonserver, whose pid is its process group's id
        server_pid = int(Path(f"/proc/{self.cli.pid}/task/{self.cli.pid}/children").read_text().split()[0])
        return list(supervise.live_stubs(server_pid).values())

    def report(self) -> str:
        """mgm-serve's own messages and the end of the server log (status tables left out)."""
        log = [ln for ln in self.server_log.read_text().splitlines() if not ln.startswith(("|", "+"))]
        return "".join(self.err)[-1500:] + "\nserver log:\n" + "\n".join(log[-30:])

    def finish(self, timeout: float = 60) -> int:
        try:
            self.cli.wait(timeout=timeout)
        finally:
            self.cli.kill()
        return self.cli.returncode


def stream_slow(url: str, steps: int, events: queue.Queue):
    """A gRPC stream on `slow`; (time, 'ok'|'final'|'error: ...') goes to `events` per response."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)

    def callback(result, error):
        if error is not None:
            events.put((time.monotonic(), f"error: {error}"))
        elif result.get_response().parameters["triton_final_response"].bool_param:
            events.put((time.monotonic(), "final"))
        else:
            events.put((time.monotonic(), "ok"))

    client.start_stream(callback=callback)
    inp = grpcclient.InferInput("STEPS", [1], "INT32")
    inp.set_data_from_numpy(np.array([steps], np.int32))
    client.async_stream_infer("slow", [inp], enable_empty_final_response=True)
    return client


def wait_event(events: queue.Queue, timeout: float) -> tuple[float, str]:
    try:
        return events.get(timeout=timeout)
    except queue.Empty:
        return time.monotonic(), "timeout"


def test_killed_stub_turns_readiness_down_and_fails_the_request_in_flight(tmp_path):
    served = Served(tmp_path)
    events: queue.Queue = queue.Queue()
    client = stream_slow(served.grpc_url, 400, events)  # 20 s of responses
    try:
        assert wait_event(events, 30)[1] == "ok"
        assert served.ready_status() == 200
        slow_stubs = [s for s in served.stubs() if s.instance.startswith("slow_")]
        assert len(slow_stubs) == 2, served.stubs()
        killed = time.monotonic()
        for stub in slow_stubs:  # the busy one is one of them
            process.os.kill(stub.pid, signal.SIGKILL)
        while served.ready_status() == 200 and time.monotonic() - killed < 30:
            time.sleep(0.05)
        unready_s = time.monotonic() - killed
        while True:  # responses already on the way may still arrive; then the error or nothing
            at, what = wait_event(events, 30)
            if what != "ok":
                break
        error_s = at - killed
        code = served.finish(timeout=30)
    finally:
        client.close()
    print(f"stub killed: readiness down after {unready_s:.2f} s, in-flight error after {error_s:.2f} s")
    assert unready_s < 2, f"readiness still 200 {unready_s:.1f} s after the stub died"
    assert what.startswith("error"), f"the request in flight got {what!r} instead of an error"
    assert error_s < 10
    assert code == cli.STUB_DIED_EXIT, served.report()
    assert "died" in "".join(served.err)
    assert shm.regions(served.shm_prefix) == [], "shm regions left behind"


def test_sigterm_with_streams_in_flight_drains_and_exits_zero(tmp_path):
    served = Served(tmp_path)
    regions = shm.regions(served.shm_prefix)
    assert len(regions) >= 5  # add_one, hold, plus1 + two `slow` instances
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in regions), "shm regions are readable by others"
    streams = [queue.Queue() for _ in range(2)]
    clients = [stream_slow(served.grpc_url, 40, events) for events in streams]  # 2 s each
    try:
        for events in streams:
            assert wait_event(events, 30)[1] == "ok"
        asked = time.monotonic()
        served.cli.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = queue.Queue()
        late_client = stream_slow(served.grpc_url, 3, late)  # new work while draining
        refused = wait_event(late, 10)[1]
        late_client.close()
        outcomes = []
        for events, client in zip(streams, clients, strict=True):
            while (what := wait_event(events, 30)[1]) == "ok":
                pass
            outcomes.append(what)
            client.close()  # as MGMClient does after an answer: an open stream pins its model
        code = served.finish(timeout=60)
        exit_s = time.monotonic() - asked
    finally:
        for client in clients:
            client.close()
    print(f"SIGTERM with 2 streams: {outcomes}, new request {refused!r}, exit {code} after {exit_s:.1f} s")
    assert outcomes == ["final", "final"], outcomes  # drained, not cut
    assert refused.startswith("error") and "slow" in refused, refused
    assert code == 0, served.report()
    assert shm.regions(served.shm_prefix) == [], "shm regions left behind"
    assert exit_s < 20


def test_sigterm_lets_an_ensemble_in_flight_finish_its_later_steps(tmp_path):
    import tritonclient.http as httpclient

    served = Served(tmp_path)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.ports[0]}")
    x = np.arange(4, dtype=np.float32)
    inp = httpclient.InferInput("X", [4], "FP32")
    inp.set_data_from_numpy(x)
    pending = client.async_infer("pipe", [inp])
    time.sleep(0.5)  # inside `hold`; `plus1` is still to come
    served.cli.send_signal(signal.SIGTERM)
    try:
        result = pending.get_result(timeout=30)
        outcome = result.as_numpy("Z").tolist()
    except Exception as exc:  # noqa: BLE001 - the failure is the finding; reported below
        outcome = f"{type(exc).__name__}: {exc}"
    client.close()
    code = served.finish(timeout=60)
    print(f"SIGTERM during an ensemble's first step: {outcome}, exit {code}")
    assert outcome == (x + 1).tolist(), outcome
    assert code == 0, served.report()
