"""Shared fixtures: tiny MGM checkpoints written once per test session in the official format.

Helpers (images, the served stack) live in tests/helpers/.
"""

from __future__ import annotations

import pytest

from mgm_ref.tiny import write_tiny_checkpoint
from tests.helpers.served import serve


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Factory: tiny_checkpoints(llm, hd=False, template=None) -> path, cached per session."""
    cache = {}

    def get(llm: str = "llama", hd: bool = False, template: str | None = None, shards: int = 2):
        key = (llm, hd, template, shards)
        if key not in cache:
            name = f"{llm}{'-hd' if hd else ''}{'-' + template if template else ''}-s{shards}"
            cache[key] = write_tiny_checkpoint(
                tmp_path_factory.mktemp(name), llm, hd, seed=0, template=template, shards=shards
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def served_llama(tiny_checkpoints, tmp_path_factory):
    """One tiny-llama server shared by the serving, client and web tests (each start costs ~30 s)."""
    yield from serve(tiny_checkpoints, tmp_path_factory, "llama")


@pytest.fixture
def stub(monkeypatch):
    """Fake `triton_python_backend_utils` for running a model.py in process."""
    from tests import triton_stub

    return triton_stub.install(monkeypatch)


@pytest.fixture(scope="module")
def llama_dir(tiny_checkpoints):
    return tiny_checkpoints("llama")
