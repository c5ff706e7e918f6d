"""Image -> pixel tensors, exactly as the original MGM (mm_utils.process_images + cli code).

1. convert('RGB'), pad to a square with the CLIP-mean colour (122, 116, 104);
2. CLIPImageProcessor at the HR ("aux") size: PIL bicubic, x1/255, CLIP mean/std -> images_aux;
3. the LR tensor is *derived from the normalised HR tensor* by bilinear interpolation (no antialias);
4. HD: the 672 LR tensor is cut into TL, TR, BL, BR crops, then the 336 global view is appended.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import CLIPImageProcessor

from mgm_ref.config import MGMConfig
from mgm_ref.constants import ACCEPTED_IMAGE_FORMATS, CLIP_MEAN, CLIP_STD, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from mgm_ref.errors import ImageError

PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104)
# CLIPImageProcessor guesses the channel axis from the array's shape: a padded square of side 1 or 3
# reads as channels-first (an error for 1, silently wrong pixels for 3), so smaller squares are refused.
MIN_IMAGE_SIDE = 4


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image from a path, raw bytes or a PIL image; bad input raises ImageError."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, Path)):
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise ImageError(f"cannot read image file {source}: {e.strerror or e}") from None
        else:
            data = bytes(source)
        if not data:
            raise ImageError("the image is empty (0 bytes)")
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"the image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"cannot decode the image: {e}") from None
        if not isinstance(source, (str, Path)):  # bytes come from a request; a local file is the operator's
            check_image_format(image)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode the image: {e}") from None


def check_image_format(image: Image.Image) -> None:
    """Only the formats the README promises (JPEG, PNG, WebP) are decoded: every other PIL decoder
    (TIFF, BMP, ICO, PSD, ...) is attack surface nobody asked for. Reads the header only."""
    if image.format not in ACCEPTED_IMAGE_FORMATS:
        accepted = ", ".join(ACCEPTED_IMAGE_FORMATS)
        raise ImageError(f"the image is {image.format or 'of an unknown format'}; accepted formats: {accepted}")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    format: str
    width: int
    height: int

    @property
    def padded_side(self) -> int:
        """Side of the square `expand2square` pads the image to (what the towers' resize starts from)."""
        return max(self.width, self.height)


def inspect_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageHeader:
    """Check encoded image bytes from their header alone (PIL opens lazily: nothing is decoded).

    The pixel limit applies to the padded square, the largest buffer preprocessing allocates: a
    20000x10 image becomes a 20000x20000 canvas. Bad input raises ImageError.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_image_format(image)
            header = ImageHeader(image.format or "unknown", *image.size)
    except Image.DecompressionBombError as e:  # PIL's own, larger bound; ours says what the limit is
        raise ImageError(f"the image is too large: {e}; the limit is {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot decode the image: {e}") from None
    side = header.padded_side
    if min(header.width, header.height) < 1:
        raise ImageError(f"the image has no pixels ({header.width}x{header.height})")
    if side < MIN_IMAGE_SIDE:
        raise ImageError(
            f"the image is {header.width}x{header.height} pixels; "
            f"images must be at least {MIN_IMAGE_SIDE} pixels wide or high"
        )
    if side * side > max_pixels:
        raise ImageError(
            f"the image is {header.width}x{header.height}, padded to a {side}x{side} square = {side * side} "
            f"pixels; the limit is {max_pixels}"
        )
    return header


def expand2square(image: Image.Image, background=PAD_COLOR) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class PixelInputs:
    images: torch.Tensor  # (N, 3, 336, 336), or HD (N, 5, 3, 336, 336): crops TL, TR, BL, BR, then global
    images_aux: torch.Tensor  # (N, 3, S, S), S = image_size_aux


class ImageProcessor:
    """Turns PIL images into the two pixel tensors of one MGM variant."""

    def __init__(self, config: MGMConfig):
        self.config = config
        size = config.image_size_aux
        # The original mutates the CLIP processor to the aux size; build it with those values directly.
        self.clip_processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=Image.Resampling.BICUBIC,
            do_center_crop=True,
            do_convert_rgb=True,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )

    def __call__(self, images: list[Image.Image]) -> PixelInputs:
        if not images:
            raise ImageError("no images given")
        aux = torch.cat([self.hr_pixels(image) for image in images])
        return PixelInputs(images=self.lr_views(aux), images_aux=aux)

    def hr_pixels(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, S, S) normalised HR pixels of one image."""
        square = expand2square(image.convert("RGB"))
        # transformers annotates preprocess() as returning an image; it returns a BatchFeature
        batch = self.clip_processor.preprocess(square, return_tensors="np")
        return torch.from_numpy(batch["pixel_values"])  # type: ignore[index]

    def lr_views(self, images_aux: torch.Tensor) -> torch.Tensor:
        """LR views derived from the normalised HR tensor, as the original CLI does."""
        cfg = self.config
        lr = F.interpolate(images_aux, size=(cfg.lr_input_size,) * 2, mode="bilinear", align_corners=False)
        if not cfg.hd:
            return lr
        g, s = cfg.image_grid, cfg.lr_size
        n = lr.shape[0]
        crops = lr.reshape(n, 3, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3, s, s)
        views = [crops]
        if cfg.image_global:
            views.append(F.interpolate(lr, size=(s, s), mode="bilinear", align_corners=False)[:, None])
        return torch.cat(views, dim=1).contiguous()
