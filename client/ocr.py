"""OCR hints for MGM prompts (`mgm-client --ocr`, the web demo's OCR toggle).

The original MGM runs PaddleOCR on the image, keeps the texts recognised with confidence > 0.1,
joins them with ", " and appends ``"\\nReference OCR Token: " + tokens + "\\n"`` to the user's text.
Here the OCR engine is RapidOCR (`rapidocr-onnxruntime`): the same PaddleOCR detection and
recognition models, converted to ONNX and shipped inside the wheel, so nothing is downloaded and
no GPU or Paddle install is needed.

Where the hint goes, and the bug this fixes
-------------------------------------------
The original CLI appends the hint to the user's question, which is right. The original worker
instead inserts it into the *already templated* prompt with `add_content`, which looks for
``' [/INST]'``, the last ``<|im_end|>`` or ``'###Assistant:'``. Vicuna, Gemma and LLaMA-3 prompts
contain none of these, so `rfind` returns -1 and the hint lands before the prompt's final character
(for Vicuna: ``... ASSISTANT\\nReference OCR Token: ...\\n:``), inside the assistant header.

This client never touches a templated prompt: the hint is appended to the question text, and the
server applies the chat template to that question. The hint therefore sits inside the user turn,
before the assistant header, for every template (checked for each template in
tests/test_client_cli.py).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterable

from client.mgm_client import ClientError

MIN_CONFIDENCE = 0.1  # the original keeps texts with confidence > 0.1
OCR_PREFIX = "\nReference OCR Token: "


@functools.lru_cache(maxsize=1)
def _engine():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        raise ClientError("OCR needs rapidocr-onnxruntime: pip install 'mgm-deploy[client]'") from None
    return RapidOCR()


_lock = threading.Lock()  # one OCR run at a time: the engine is not documented as thread-safe
_cache: dict[str, list[str]] = {}  # sha256 of the image bytes -> texts (the web demo asks once per turn)
_CACHE_SIZE = 32


def ocr_texts(image: bytes, min_confidence: float = MIN_CONFIDENCE) -> list[str]:
    """Texts recognised in one encoded image (PNG, JPEG, ...), top to bottom, above `min_confidence`."""
    key = hashlib.sha256(image).hexdigest() + f":{min_confidence}"
    with _lock:
        if key in _cache:
            return list(_cache[key])
        try:
            result, _ = _engine()(image)
        except ClientError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine raises plain errors on undecodable input
            raise ClientError(f"OCR failed: {type(e).__name__}: {e}") from None
        texts = [text for _box, text, score in (result or []) if float(score) > min_confidence and text.strip()]
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = texts
        return list(texts)


def ocr_tokens(images: Iterable[bytes], min_confidence: float = MIN_CONFIDENCE) -> str:
    """All images' texts joined with ", " (the original's format); "" when nothing was recognised."""
    texts = [t for image in images for t in ocr_texts(image, min_confidence)]
    # A literal "<image>" would be taken for an image placeholder by the server.
    return ", ".join(t.replace("<image>", "image") for t in texts)


def add_ocr_reference(question: str, tokens: str) -> str:
    """The question with the original's OCR hint appended (unchanged when there are no tokens)."""
    return f"{question}{OCR_PREFIX}{tokens}\n" if tokens else question
