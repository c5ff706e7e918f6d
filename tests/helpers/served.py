"""A tiny checkpoint served end to end on a real tritonserver (CPU), with its mgm_ref oracle."""

from __future__ import annotations

from client.cpu_repo import prepare_cpu_repo


def served_text(ref, ids) -> str:
    """The answer the server gives for `ids`: mgm_ref's decode, less the incomplete UTF-8 character an
    answer cut by max_tokens can end in (the server drops it; the original shows U+FFFD)."""
    from mgm_ref.conversation import trim_answer
    from triton_models.lib.detokenize import drop_incomplete_tail

    return trim_answer(drop_incomplete_tail(ref.tokenizer.decode(ids, skip_special_tokens=True)), ref.conv_mode)


class Served:
    def __init__(self, ckpt, tmp):
        from mgm_ref.loader import load_model
        from triton_models.server import TritonServer

        self.ref = load_model(ckpt)
        _, repo = prepare_cpu_repo(ckpt, tmp, max_batch_size=8, log=lambda m: None)
        self.server = TritonServer(repo).start(timeout=300)

    def client(self, protocol="grpc", model="mgm_bls"):
        from client.mgm_client import MGMClient

        url = self.server.grpc_url if protocol == "grpc" else self.server.http_url
        return MGMClient(url, protocol=protocol, model=model, timeout_s=120)

    def expected(self, prompt, images, max_tokens=10, history=None) -> tuple[str, int]:
        """mgm_ref's greedy answer (text, token count) for the same request."""
        from mgm_ref.conversation import build_prompt
        from mgm_ref.model import GenerationParams
        from mgm_ref.preprocess import load_image

        pils = [load_image(b) for b in images]
        ids = self.ref.generate(
            [self.ref.tokenize(build_prompt(self.ref.conv_mode, prompt, len(pils), history))],
            self.ref.image_features(pils) if pils else None,
            GenerationParams(max_new_tokens=max_tokens, temperature=0),
        )[0]
        return served_text(self.ref, ids), len(ids)

    def stop(self) -> None:
        from triton_models.server import port_is_free

        ports = self.server.ports
        self.server.stop()
        assert all(port_is_free(p) for p in ports), "the server left a port bound"


def serve(tiny_checkpoints, tmp_path_factory, llm, hd=False):
    """Generator for a fixture: yields a Served, stops it afterwards."""
    served = Served(tiny_checkpoints(llm, hd), tmp_path_factory.mktemp(f"serve-{llm}{'-hd' if hd else ''}"))
    try:
        yield served
    finally:
        served.stop()
