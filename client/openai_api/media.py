"""Image URLs -> encoded image bytes, under the server's size limits and media policy.

The server fetches nothing unless the operator allows it: `data:` URLs always work, `http(s)://`
only for `--allowed_media_domains`, `file://` only below `--allowed_local_media_path` (against
SSRF and reads of local files, the same opt-in rule as vLLM and trtllm-serve).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from client.openai_api.errors import bad_request, too_large

MiB = 1024 * 1024
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.DOTALL)
MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 10 * MiB  # one encoded image
    allowed_domains: tuple[str, ...] = ()  # http(s) hosts the server may fetch from
    allowed_local_path: Path | None = None  # file:// only below this folder
    fetch_timeout_s: float = 10.0


def image_format(blob: bytes) -> str | None:
    """PNG / JPEG / WebP from the magic bytes (the formats the preprocessing decodes)."""
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if blob.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(blob) >= 12 and blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "webp"
    return None


def _checked(blob: bytes, param: str) -> bytes:
    if image_format(blob) is None:
        raise bad_request("the image is not a PNG, JPEG or WebP file", param, "invalid_image")
    return blob


async def load_image(url: str, policy: MediaPolicy, param: str) -> bytes:
    scheme = urlsplit(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        return _checked(_from_data_url(url, policy, param), param)
    if scheme in ("http", "https"):
        return _checked(await _fetch(url, policy, param), param)
    if scheme == "file":
        return _checked(_read_local(url, policy, param), param)
    raise bad_request("image_url.url must be a data:image/...;base64 URL", param, "invalid_image_url")


def _from_data_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise bad_request("malformed data URL: expected data:image/png;base64,<data>", param, "invalid_image_url")
    mime = (m["mime"] or "").lower()
    if mime not in MIME_TYPES:
        raise bad_request(
            f"unsupported image type {mime or '(none)'!r}: send PNG, JPEG or WebP", param, "invalid_image_format"
        )
    data = m["data"]
    # The decoded size is known from the text's length: refuse before decoding anything.
    if len(data) * 3 // 4 > policy.max_image_bytes + 2:
        raise too_large(f"the image is over the server's limit of {policy.max_image_bytes / MiB:g} MiB", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the image's base64 data is invalid", param, "invalid_image") from None


async def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    host = (urlsplit(url).hostname or "").lower()
    if host not in policy.allowed_domains:
        raise bad_request(
            f"this server does not fetch image URLs ({host or url!r} is not in --allowed_media_domains): "
            "send the image inline as a data:image/...;base64 URL",
            param,
            "image_url_not_allowed",
        )
    import httpx

    blob = bytearray()
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=policy.fetch_timeout_s) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"fetching the image gave HTTP {resp.status_code}", param, "image_fetch_failed")
                async for part in resp.aiter_bytes():
                    blob += part
                    if len(blob) > policy.max_image_bytes:
                        raise too_large(
                            f"the image is over the server's limit of {policy.max_image_bytes / MiB:g} MiB", param
                        )
    except httpx.HTTPError as e:
        raise bad_request(f"cannot fetch the image: {type(e).__name__}", param, "image_fetch_failed") from None
    return bytes(blob)


def _read_local(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.allowed_local_path is None:
        raise bad_request(
            "file:// image URLs are refused: the server has no --allowed_local_media_path",
            param,
            "image_url_not_allowed",
        )
    root = policy.allowed_local_path.resolve()
    path = Path(unquote(urlsplit(url).path)).resolve()  # symlinks and .. resolved before the check
    if not path.is_relative_to(root):
        raise bad_request(
            f"file:// images must lie under the allowed media path {root}", param, "image_url_not_allowed"
        )
    if not path.is_file():
        raise bad_request(f"no such image file under {root}", param, "invalid_image_url")
    if path.stat().st_size > policy.max_image_bytes:
        raise too_large(f"the image is over the server's limit of {policy.max_image_bytes / MiB:g} MiB", param)
    return path.read_bytes()
