"""Watching a server's python-backend stubs: each is a process of the server's group, and Triton
itself neither restarts a stub that died nor turns unready, so the launcher has to notice.

    watch = StubWatch(server.pid, on_death=lambda stub: ...)   # polls /proc every `interval` s
    watch.start(); ...; watch.stop()
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")
# /proc/<pid>/comm holds the first 15 bytes of the executable's name.
STUB_COMM = "triton_python_backend_stub"[:15]


@dataclasses.dataclass(frozen=True)
class Stub:
    pid: int
    instance: str  # Triton's instance name, e.g. "mgm_bls_0_0" (model, group, index)
    model_file: str


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
    return raw[raw.rfind(")") + 2 :].split()


def _stub(pid: int, group: int) -> Stub | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in "ZX" or int(fields[2]) != group:
        return None  # gone, a zombie nobody reaped yet, or another group's process
    try:
        if (PROC / str(pid) / "comm").read_text().strip() != STUB_COMM:
            return None
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # argv: stub, model.py, shm region, shm size, growth, parent pid, backend dir, ipc size, instance, ...
    instance = argv[8].decode(errors="replace") if len(argv) > 8 else "?"
    model_file = argv[1].decode(errors="replace") if len(argv) > 1 else "?"
    return Stub(pid, instance, model_file)


def live_stubs(group: int) -> dict[int, Stub]:
    """The running (not zombie) python-backend stubs of process group `group`, by pid."""
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stub = _stub(int(entry.name), group)
            if stub is not None:
                found[stub.pid] = stub
    return found


class StubWatch:
    """Calls `on_death(stub)` (from its own thread) for every stub that stops running while watched.

    A stub seen once and missing later died: Triton starts stubs while loading models and ends them
    only when unloading, so stop() the watch before stopping the server. `on_tick` runs every poll.
    """

    def __init__(
        self,
        group: int,
        on_death: Callable[[Stub], None],
        interval: float = 0.2,
        on_tick: Callable[[], None] | None = None,
    ):
        self.group = group
        self.on_death = on_death
        self.on_tick = on_tick
        self.interval = interval
        self.known: dict[int, Stub] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-watch", daemon=True)

    def start(self) -> StubWatch:
        self.known = live_stubs(self.group)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            now = live_stubs(self.group)
            if self._stopped.is_set():
                return
            for pid in sorted(self.known.keys() - now.keys()):
                self.on_death(self.known[pid])
            self.known = now
            if self.on_tick is not None:
                self.on_tick()
