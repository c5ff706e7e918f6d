"""The README's Limits table says what the code enforces, and the limits are derived, not assumed:
images per request from the context, text bytes from max_input_len, request sizes from both."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from client.web.server import DEFAULT_MAX_CONNECTIONS, DEFAULT_SOCKET_TIMEOUT_S, MAX_BODY_BYTES
from mgm_ref import constants as C
from mgm_ref.errors import ImageError
from mgm_ref.preprocess import load_image
from mgm_runtime.contract import ContractError, derive_limits

README = Path(__file__).resolve().parents[1] / "README.md"


def limits_rows() -> dict[str, str]:
    text = README.read_text()
    table = text[text.index("### Limits") : text.index("### Metrics")]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): "|".join(cells[1:]) for cells in rows[1:]}


def test_the_readme_table_has_the_numbers_the_code_uses():
    rows = limits_rows()
    mib = 1 << 20
    assert f"{C.MAX_IMAGE_BYTES // mib} MiB" in rows["encoded image"]
    assert f"{C.MAX_IMAGE_PIXELS:,}" in rows["image pixels"] and "padded square" in rows["image pixels"]
    assert f"longest side is at most {int(C.MAX_IMAGE_PIXELS**0.5)}" in rows["image pixels"]
    assert ", ".join(f if f != "WEBP" else "WebP" for f in C.ACCEPTED_IMAGE_FORMATS) in rows["image formats"]
    per_request = rows["images per request"]
    assert f"min({C.MAX_IMAGES_PER_REQUEST}, (max_input_len - {C.MIN_TEXT_TOKENS}) // tokens_per_image)" in per_request
    assert f"{C.max_images_for(2048, 576)} at 2048 tokens" in per_request
    assert f"{C.max_images_for(4096, 576)} at 4096" in per_request and "HD: 1" in per_request
    text = rows["text: query + history + system prompt"]
    assert f"{C.MAX_BYTES_PER_TOKEN} bytes x max_input_len ({C.text_bytes_limit(2048) >> 10} KiB at 2048" in text
    assert f"{C.MAX_TEXT_BYTES // mib} MiB ({C.MAX_BYTES_PER_TOKEN} x {C.MAX_CONTEXT_TOKENS}" in text
    assert f"{C.MAX_GRPC_REQUEST_BYTES // mib} MiB" in rows["request over gRPC"]
    assert f"{C.MAX_HTTP_REQUEST_BYTES // mib} MiB" in rows["request over HTTP"]
    assert f"{MAX_BODY_BYTES / mib:.1f} MiB" in rows["web demo body"]
    assert f"{DEFAULT_MAX_CONNECTIONS} at once" in rows["web demo connections"]
    assert f"{DEFAULT_SOCKET_TIMEOUT_S:.0f} s per socket" in rows["web demo connections"]


def test_request_sizes_are_derived_from_the_parts():
    assert C.MAX_GRPC_REQUEST_BYTES >= C.MAX_IMAGES_PER_REQUEST * C.MAX_IMAGE_BYTES + C.MAX_TEXT_BYTES
    assert C.MAX_TEXT_BYTES == C.text_bytes_limit(C.MAX_CONTEXT_TOKENS)
    assert MAX_BODY_BYTES >= 4 * (C.MAX_IMAGES_PER_REQUEST * C.MAX_IMAGE_BYTES) // 3 + C.MAX_TEXT_BYTES


def test_images_per_request_come_from_the_context():
    # 4 x 576 rows cannot fit 2048 tokens with any text: the derived maximum is 3, and 3 needs 1792
    assert C.max_images_for(2048, 576) == 3 and C.max_images_for(4096, 2880, hd=True) == 1
    assert C.max_images_for(1780, 576) == 2  # (1780 - 1) // 576 would say 3, leaving 52 tokens of text
    assert C.max_images_for(600, 576) == 0
    with pytest.raises(ContractError, match="leaves no room for text"):
        derive_limits(max_batch_size=1, tokens_per_image=576, max_images_per_request=4, max_input_len=2048)
    with pytest.raises(ContractError, match=f"use at least {3 * 576 + C.MIN_TEXT_TOKENS}"):
        derive_limits(max_batch_size=1, tokens_per_image=576, max_images_per_request=3, max_input_len=1780)
    ok = derive_limits(max_batch_size=2, tokens_per_image=576, max_images_per_request=3, max_input_len=2048)
    assert ok["max_multimodal_len"] == 2 * 3 * 576


def test_cpu_repository_derives_its_image_count(tiny_checkpoints):
    from mgm_ref.config import MGMConfig
    from triton_models.repo_builder import cpu_contract

    cfg = MGMConfig.from_model_dir(tiny_checkpoints("llama"))
    assert cpu_contract(cfg, None, 1780, None, None).max_images_per_request == 2
    assert cpu_contract(cfg, None, 2048, None, None).max_images_per_request == 3


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "ICO", "PPM"])
def test_only_the_documented_formats_are_decoded(fmt):
    data = io.BytesIO()
    Image.new("RGB", (16, 16)).save(data, fmt)
    with pytest.raises(ImageError, match=re.escape(f"accepted formats: {', '.join(C.ACCEPTED_IMAGE_FORMATS)}")):
        load_image(data.getvalue())


@pytest.mark.parametrize("fmt", C.ACCEPTED_IMAGE_FORMATS)
def test_the_documented_formats_are_decoded(fmt):
    data = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(data, fmt)
    assert load_image(data.getvalue()).size == (16, 16)
