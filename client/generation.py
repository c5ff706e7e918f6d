"""Text-to-image generation as in the original MGM (`mgm-client --gen`, the web demo's toggle).

MGM models fine-tuned on the generation data answer a question ending in " <GEN>" with a
description and a Stable Diffusion prompt between plain-text tags ``<h> ... </h>``. The original
CLI takes the *last* tagged span, ``text.split("</h>")[-2].split("<h>")[-1]``, and renders it with
SDXL from the hub. Here:

- `extract_image_prompt` has the same semantics but returns None instead of raising or returning
  junk when the answer holds no complete span (small models often emit none, MGM issue #26);
- `render_image` only loads a local SDXL folder (``from_pretrained(dir, local_files_only=True)``)
  and never downloads; when diffusers or the folder is missing, `unavailable_reason` says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.mgm_client import ClientError

GEN_TAG = " <GEN>"
OPEN, CLOSE = "<h>", "</h>"
# The original's fixed negative prompt (mgm/serve/cli.py).
NEGATIVE_PROMPT = (
    "out of frame, lowres, text, error, cropped, worst quality, low quality, jpeg artifacts, ugly, duplicate, "
    "morbid, mutilated, out of frame, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, "
    "mutation, deformed, blurry, dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, "
    "disfigured, gross proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, "
    "fused fingers, too many fingers, long neck, username, watermark, signature"
)
DEFAULT_OUTPUT = "generate.png"


def add_gen_tag(question: str) -> str:
    """The question with the original's generation trigger appended."""
    return question + GEN_TAG


def extract_image_prompt(answer: str) -> str | None:
    """The last complete ``<h>...</h>`` span of an answer, stripped; None when there is none.

    Same result as the original's ``answer.split("</h>")[-2].split("<h>")[-1]`` whenever the
    answer holds a span; an answer with no ``</h>``, no ``<h>`` before it, or an empty span gives None.
    """
    end = answer.rfind(CLOSE)
    if end < 0:
        return None
    start = answer.rfind(OPEN, 0, end)
    if start < 0:
        return None
    prompt = answer[start + len(OPEN) : end].strip()
    return prompt or None


def unavailable_reason(sd_model: str | Path | None) -> str | None:
    """Why `render_image` cannot run here (diffusers missing, no or bad --sd_model); None when it can."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "diffusers is not installed (pip install diffusers), so no image was rendered"
    if not sd_model:
        return "no --sd_model given (a local Stable Diffusion XL folder), so no image was rendered"
    if not (Path(sd_model) / "model_index.json").is_file():
        return f"{sd_model} is not a local diffusers folder (no model_index.json), so no image was rendered"
    return None


@dataclass
class GenResult:
    prompt: str | None  # the extracted SD prompt, None when the answer had no <h> span
    image_path: Path | None  # where the rendered image was saved, None when nothing was rendered
    note: str = ""  # why nothing was rendered


_pipelines: dict[str, object] = {}


def render_image(prompt: str, sd_model: str | Path, output_file: str | Path = DEFAULT_OUTPUT) -> Path:
    """Render `prompt` with the local SDXL folder `sd_model` (loaded once per process) and save it."""
    reason = unavailable_reason(sd_model)
    if reason:
        raise ClientError(reason)
    import torch
    from diffusers import StableDiffusionXLPipeline

    key = str(Path(sd_model).resolve())
    if key not in _pipelines:
        cuda = torch.cuda.is_available()
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(sd_model), local_files_only=True, torch_dtype=torch.float16 if cuda else torch.float32
            )
        except Exception as e:  # noqa: BLE001 - diffusers raises many kinds for a bad folder
            raise ClientError(f"cannot load the SDXL pipeline from {sd_model}: {e}") from None
        _pipelines[key] = pipe.to("cuda") if cuda else pipe
    image = _pipelines[key](prompt, negative_prompt=NEGATIVE_PROMPT).images[0]
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def generate_from_answer(
    answer: str, sd_model: str | Path | None, output_file: str | Path = DEFAULT_OUTPUT
) -> GenResult:
    """Extract the SD prompt from an answer and render it when this machine can; never downloads."""
    prompt = extract_image_prompt(answer)
    if prompt is None:
        return GenResult(
            None,
            None,
            "the answer has no <h>...</h> image prompt, so no image was rendered (small models often emit none)",
        )
    reason = unavailable_reason(sd_model)
    if reason:
        return GenResult(prompt, None, reason)
    return GenResult(prompt, render_image(prompt, sd_model, output_file))
