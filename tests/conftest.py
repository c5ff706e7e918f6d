"""Shared fixtures: tiny MGM checkpoints written once per test session in the official format."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from build_engines.vision import rel_l2  # noqa: F401  (one definition for tests and builds)
from mgm_ref.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Factory: tiny_checkpoints(llm, hd=False, template=None) -> path, cached per session."""
    cache = {}

    def get(llm: str = "llama", hd: bool = False, template: str | None = None, shards: int = 2):
        key = (llm, hd, template, shards)
        if key not in cache:
            name = f"{llm}{'-hd' if hd else ''}{'-' + template if template else ''}-s{shards}"
            cache[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(name), llm, hd, seed=0,
                                               template=template, shards=shards)
        return cache[key]

    return get


def png(image) -> bytes:
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Served:
    """A tiny checkpoint served end to end on a real tritonserver (CPU), plus its mgm_ref oracle."""

    def __init__(self, ckpt, tmp):
        from build_engines.vision import build_vision
        from mgm_ref.loader import load_model
        from triton_models.repo_builder import build_repo
        from triton_models.server import TritonServer

        self.ref = load_model(ckpt)
        build_vision(self.ref.vision, self.ref.config, tmp / "engines" / "vision", dtype="float32",
                     backend="onnxruntime", max_batch_size=4, verify=False, log=lambda m: None)
        repo = build_repo(ckpt, tmp / "engines", tmp / "repo", backend="cpu", max_batch_size=8)
        self.server = TritonServer(repo).start(timeout=300)

    def client(self, protocol="grpc", model="mgm_bls"):
        from client.mgm_client import MGMClient
        url = self.server.grpc_url if protocol == "grpc" else self.server.http_url
        return MGMClient(url, protocol=protocol, model=model, timeout_s=120)

    def expected(self, prompt, images, max_tokens=10) -> tuple[str, int]:
        """mgm_ref's greedy answer (text, token count) for the same request."""
        from mgm_ref.conversation import build_prompt
        from mgm_ref.model import GenerationParams
        from mgm_ref.preprocess import load_image
        pils = [load_image(b) for b in images]
        ids = self.ref.generate([self.ref.tokenize(build_prompt(self.ref.conv_mode, prompt, len(pils)))],
                                self.ref.image_features(pils) if pils else None,
                                GenerationParams(max_new_tokens=max_tokens, temperature=0))[0]
        return self.ref.decode(ids), len(ids)

    def stop(self) -> None:
        from triton_models.server import port_is_free
        ports = self.server.ports
        self.server.stop()
        assert all(port_is_free(p) for p in ports), "the server left a port bound"


def serve(tiny_checkpoints, tmp_path_factory, llm, hd=False):
    served = Served(tiny_checkpoints(llm, hd), tmp_path_factory.mktemp(f"serve-{llm}{'-hd' if hd else ''}"))
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="session")
def served_llama(tiny_checkpoints, tmp_path_factory):
    """One tiny-llama server shared by the serving, client and web tests (each start costs ~30 s)."""
    yield from serve(tiny_checkpoints, tmp_path_factory, "llama")


def random_image(width: int = 500, height: int = 300, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))

