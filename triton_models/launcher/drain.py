"""Draining a server before it stops: the models clients call are unloaded first, through Triton's
model-repository API, while the models they call stay up.

Triton's own SIGTERM path stops every model at once (new requests to any of them are refused), so
an ensemble or BLS request in flight fails at its next step. Unloading only the entry models first
refuses new work at the door ("has no available versions"), lets every request in flight finish
(Triton unloads a model once its requests are released) and only then stops the rest.
The server must run with `--model-control-mode=explicit` (argv does this) and the admin key.

Entry models are those no ensemble names as a step; a BLS model's callees are its code's business,
and on MGM repositories they are also the ensemble's steps.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from triton_models.launcher.errors import ServerError

_STEP_MODEL = re.compile(r'model_name\s*:\s*"([^"]+)"')


def _config(repo: Path, name: str) -> str:
    path = repo / name / "config.pbtxt"
    return path.read_text() if path.is_file() else ""


def entry_models(repo: Path) -> list[str]:
    """Model folders of `repo` that no ensemble step names (what clients call directly)."""
    names = sorted(p.name for p in repo.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())
    steps = set()
    for name in names:
        text = _config(repo, name)
        if "ensemble_scheduling" in text:
            steps.update(_STEP_MODEL.findall(text))
    return [name for name in names if name not in steps]


class Repository:
    """The model-repository API of one server over HTTP, with the admin header it needs."""

    def __init__(self, http_url: str, headers: dict[str, str], timeout: float = 10):
        self.base = f"http://{http_url}/v2/repository"
        self.headers = {**headers, "Content-Type": "application/json"}
        self.timeout = timeout

    def _post(self, path: str) -> bytes:
        request = urllib.request.Request(f"{self.base}{path}", data=b"{}", headers=self.headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()

    def index(self) -> dict[str, str]:
        """model name -> state (READY, UNLOADING, UNAVAILABLE, ...) as Triton reports it."""
        return {entry["name"]: entry.get("state", "") for entry in json.loads(self._post("/index") or b"[]")}

    def unload(self, name: str) -> None:
        """Starts the unload; Triton finishes it once the model's requests are released."""
        self._post(f"/models/{name}/unload")


def drain(repository: Repository, models: list[str], timeout: float, poll: float = 0.1) -> list[str]:
    """Unload `models` and wait up to `timeout` s for them to finish; the ones still unloading."""
    loaded = [name for name, state in repository.index().items() if name in models and state == "READY"]
    for name in loaded:
        repository.unload(name)
    deadline = time.monotonic() + timeout
    while True:
        index = repository.index()
        busy = [name for name in loaded if index.get(name) in ("READY", "UNLOADING")]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(poll)


def drain_server(http_url: str, headers: dict[str, str], repo: Path, timeout: float) -> list[str]:
    """drain() the entry models of `repo`; what is still unloading (the server's errors raise)."""
    try:
        return drain(Repository(http_url, headers), entry_models(repo), timeout)
    except (OSError, urllib.error.HTTPError, ValueError) as exc:
        raise ServerError(f"could not drain the server at {http_url}: {exc}") from exc
