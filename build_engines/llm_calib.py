"""Calibration data for quantizing MGM's LLM: MGM-style chat prompts, with real image rows when possible.

Each sample is a two-turn conversation in the checkpoint's own template (`mgm_ref.conversation`), the image
first as in the original CLI, so the quantizers see the system prompt, role tags, separators, answers and
(multimodal mode) the projector outputs that fill the `<image>` span at serving time. In multimodal mode
the image rows come from mgm_ref's real vision path (towers + patch info mining + projector) run on images
from `image_dir` or, when none are given, synthetic ones (no image data set is available offline); the LLM
is then fed `inputs_embeds` with those rows spliced in, exactly as MGM does (Gemma scales them by
sqrt(hidden) inside HF's GemmaModel, as in training and in the TensorRT-LLM engine). Text mode drops the
`<image>` tag and calibrates on text alone.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mgm_ref.constants import IMAGE_TOKEN_INDEX
from mgm_ref.errors import CheckpointError, ImageError, MGMError

QUESTIONS = [
    "What is shown in this image? Describe it in detail.",
    "How many objects can you see, and what colors are they?",
    "What text appears in the picture? Transcribe it.",
    "Where might this photo have been taken?",
    "Describe the layout of the scene from left to right.",
    "Is there anything unusual about this image?",
    "What is the main subject doing?",
    "Write a short caption for this image.",
    "What shapes are in the picture and how are they arranged?",
    "Answer briefly: what is the dominant color?",
    "Explain what someone could learn from this diagram.",
    "Compare the top half and the bottom half of the image.",
]
ANSWERS = [
    "The image shows a red car parked next to a small house with a green door.",
    "There are three objects: a blue circle, a yellow square and a green triangle.",
    "The sign reads STOP, and below it a smaller line says Main Street 42.",
    "It looks like a city street on a sunny afternoon, with shops on both sides.",
    "On the left there is a tree, in the middle a bench, and on the right a lamp post.",
    "Yes, the sky is purple, which is unusual for a daytime photo.",
    "A dog is running along the beach while waves break behind it.",
    "A quiet harbor at sunset with boats resting on calm water.",
]
FOLLOW_UPS = [
    "Can you give more detail?",
    "What else do you notice?",
    "Summarize that in one sentence.",
    "Why do you think so?",
]


@dataclass
class CalibSample:
    ids: list[int]  # token ids; IMAGE_TOKEN_INDEX (-200) marks an image span
    image: int | None = None  # index into CalibrationSet.image_features
    max_positions: int | None = None  # cut the spliced sequence here (image rows count), as MGM truncates


@dataclass
class CalibrationSet:
    samples: list[CalibSample]
    image_features: torch.Tensor | None  # (N, T, H) projector outputs, or None in text mode
    mode: str  # "multimodal" | "text"
    reason: str  # why this mode (said in progress output and build_info.json)
    conv_mode: str
    image_source: str | None = None
    stats: dict = field(default_factory=dict)


def synthetic_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic, varied RGB scenes with sensor noise, in several aspect ratios."""
    from mgm_ref.tiny import synthetic_scene

    sizes = [(640, 480), (480, 640), (512, 512), (800, 450), (336, 336), (1024, 768)]
    return [synthetic_scene(*sizes[k % len(sizes)], seed=seed * 1000 + k, noise=12) for k in range(n)]


class CalibrationImagesError(MGMError):
    """--calib_image_dir holds no usable image."""


# What "auto" calibration takes as "no vision path": a checkpoint without vision weights, no usable images.
UNAVAILABLE_VISION = (CheckpointError, ImageError, CalibrationImagesError)


def load_image_dir(folder: str | Path, n: int) -> list[Image.Image]:
    from mgm_ref.preprocess import load_image

    if not Path(folder).is_dir():
        raise CalibrationImagesError(f"--calib_image_dir {folder} is not a folder")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp"})
    if not paths:
        raise CalibrationImagesError(f"--calib_image_dir {folder}: no .jpg/.png/.webp/.bmp images")
    return [load_image(p) for p in paths[:n]]


def conversation_texts(conv_mode: str, n: int, with_image: bool, seed: int = 0) -> list[str]:
    """n two-turn MGM conversations (question + answer, follow-up question), the image in the first turn."""
    from mgm_ref.conversation import build_prompt

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        history = [(rng.choice(QUESTIONS), rng.choice(ANSWERS))]
        texts.append(build_prompt(conv_mode, rng.choice(FOLLOW_UPS), n_images=1 if with_image else 0, history=history))
    return texts


@torch.inference_mode()
def image_features(
    model_dir: str | Path, config, images: Sequence[Image.Image], dtype: torch.dtype, device: str, batch_size: int = 4
) -> torch.Tensor:
    """Projector outputs (N, T, H) in `dtype` from mgm_ref's vision path; the encoder is freed before returning.

    On the CPU the towers run in float32 (PyTorch's 16-bit CPU kernels are ~8x slower here) and the features
    are rounded to `dtype` afterwards, which is what the LLM would receive from a 16-bit vision engine anyway.
    """
    from mgm_ref.loader import load_vision
    from mgm_ref.preprocess import ImageProcessor

    run_dtype = torch.float32 if device == "cpu" else dtype
    vision = load_vision(model_dir, dtype=run_dtype, device=device, config=config)
    processor = ImageProcessor(config)
    feats = []
    for start in range(0, len(images), batch_size):
        pixels = processor(list(images[start : start + batch_size]))
        out = vision(pixels.images.to(device, run_dtype), pixels.images_aux.to(device, run_dtype))
        feats.append(out.to("cpu", dtype))
    del vision
    return torch.cat(feats)


def build_calibration_set(
    model_dir: str | Path,
    config,
    tokenizer,
    calib_size: int,
    *,
    mode: str = "auto",
    conv_mode: str | None = None,
    image_dir: str | Path | None = None,
    num_images: int = 16,
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
    max_len: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> CalibrationSet:
    """mode: "auto" (images when the checkpoint's vision path loads), "multimodal" (must), "text"."""
    from mgm_ref.conversation import default_conv_mode
    from mgm_ref.tokenization import tokenizer_image_token

    if mode not in ("auto", "multimodal", "text"):
        raise ValueError(f"calibration mode {mode!r} is not auto|multimodal|text")
    conv_mode = conv_mode or default_conv_mode(config.family, tokenizer, config.vocab_size)
    feats, reason, source = None, "", None
    if mode == "text":
        reason = "text only, as asked (--calib_images off)"
    else:
        n_img = max(1, min(num_images, calib_size))
        try:
            images = load_image_dir(image_dir, n_img) if image_dir else synthetic_images(n_img, seed)
            source = str(image_dir) if image_dir else f"{n_img} synthetic images (no image data set offline)"
            feats = image_features(model_dir, config, images, dtype, device)
            reason = (
                f"multimodal: {config.tokens_per_image} image rows per sample from mgm_ref's vision path "
                f"(real projector outputs) on {source}"
            )
        except UNAVAILABLE_VISION as e:  # the expected ways to have no images; anything else is a bug: raised
            if mode == "multimodal":
                raise
            feats, source = None, None
            reason = f"text only: the vision path is unavailable ({type(e).__name__}: {e})"
    with_image = feats is not None
    texts = conversation_texts(conv_mode, calib_size, with_image, seed)
    samples, lengths, truncated = [], [], 0
    limit = max_len or config.max_length
    for k, text in enumerate(texts):
        ids = tokenizer_image_token(text, tokenizer) if with_image else tokenizer(text).input_ids
        length = len(ids) + (config.tokens_per_image - 1) * ids.count(IMAGE_TOKEN_INDEX)
        samples.append(CalibSample(ids=ids, image=(k % len(feats)) if with_image else None, max_positions=limit))
        lengths.append(min(length, limit))
        truncated += length > limit
    stats = {
        "samples": len(samples),
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "tokens_total": sum(lengths),
        "truncated": truncated,
    }
    log(
        f"calibration: {reason}; {len(samples)} '{conv_mode}' conversations, "
        f"{stats['tokens_min']}-{stats['tokens_max']} positions each"
    )
    return CalibrationSet(samples, feats, "multimodal" if with_image else "text", reason, conv_mode, source, stats)


def splice_embeddings(model, ids: Sequence[int], features: torch.Tensor | None) -> torch.Tensor:
    """(1, L, H) inputs_embeds: text embedded with the model's table, each -200 replaced by all image rows."""
    from mgm_ref.model import splice_image_features

    embed = model.get_input_embeddings()
    ids_t = torch.tensor(list(ids), dtype=torch.long, device=embed.weight.device)
    return splice_image_features(embed, ids_t, itertools.repeat(features)).unsqueeze(0)


def make_forward_loop(calib: CalibrationSet, log: Callable[[str], None] = print, every: int = 0):
    """The `forward_loop(model)` ModelOpt calls: one sample at a time (no padding), no gradients."""

    def forward_loop(model):
        device = model.get_input_embeddings().weight.device
        with torch.no_grad():
            for k, sample in enumerate(calib.samples):
                cut = sample.max_positions
                if sample.image is None:
                    model(input_ids=torch.tensor([sample.ids[:cut]], device=device), use_cache=False)
                else:
                    feats = calib.image_features[sample.image]
                    embeds = splice_embeddings(model, sample.ids, feats)[:, :cut]
                    model(inputs_embeds=embeds, use_cache=False)
                if every and (k + 1) % every == 0:
                    log(f"  calibrated {k + 1}/{len(calib.samples)} samples")

    return forward_loop
