"""Opening images the one way genkit does: training data, edit inputs and the server's uploads.

`inspect_image` opens and decodes a file once, cheaply, and says why it cannot be used (unreadable,
over Pillow's decompression-bomb limit, an unsupported pixel mode); `to_rgb` makes 8-bit RGB of any
supported mode (16-bit greyscale scaled, not clipped; transparency composited on white);
`open_rgb` reads a file upright (EXIF orientation) in RGB; `load_image` is the square training crop
and `to_tensor` the [-1, 1] tensor the models take.
"""

from __future__ import annotations

import enum
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr") + SIXTEEN_BIT_MODES
EXIF_ORIENTATION = 0x0112


class SkipKind(enum.Enum):
    UNREADABLE = "unreadable"
    TOO_LARGE = "too large"
    UNSUPPORTED = "unsupported"
    MISSING = "missing"


@dataclass(frozen=True)
class Skipped:
    path: Path
    kind: SkipKind
    detail: str  # what went wrong, and the fix where there is one

    def __str__(self):
        return f"{self.path}: {self.kind.value} ({self.detail})"


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    mode: str  # as stored in the file


def too_large(size: tuple[int, int]) -> str | None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or size[0] * size[1] <= limit:
        return None
    return (
        f"{size[0]}x{size[1]} pixels is over Pillow's decompression-bomb limit of {limit}; "
        "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file, or downscale it"
    )


def inspect_image(path: Path) -> ImageInfo | Skipped:
    """Open and decode the image once, cheaply; the reason it cannot be used, if any."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # too_large reports it
            image = Image.open(path)
        with image:
            if reason := too_large(image.size):
                return Skipped(path, SkipKind.TOO_LARGE, reason)
            width, height = image.size
            image.draft(None, (64, 64))  # JPEG: decode at up to 1/8 scale
            image.load()
            if image.mode not in SUPPORTED_MODES:
                return Skipped(path, SkipKind.UNSUPPORTED, f"pixel mode {image.mode}; convert it to 8- or 16-bit PNG")
            if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated a quarter turn
                width, height = height, width
            return ImageInfo(width, height, image.mode)
    except UnidentifiedImageError:
        empty = path.stat().st_size == 0
        return Skipped(path, SkipKind.UNREADABLE, "empty file" if empty else "not an image Pillow recognises")
    except Image.DecompressionBombError as exc:
        return Skipped(path, SkipKind.TOO_LARGE, f"{exc}; raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file")
    except Exception as exc:  # Pillow raises many types for damaged files: OSError, SyntaxError, ValueError...
        return Skipped(path, SkipKind.UNREADABLE, f"{type(exc).__name__}: {exc}")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled (not clipped), transparency composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        # Mode "I" is what some Pillow paths give 16-bit files; its values are taken as 0..65535.
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # 1, L, P, CMYK, YCbCr


def open_rgb(path: str | Path, *, draft_size: int | None = None) -> Image.Image:
    """The whole image as training sees it before resizing: upright (EXIF), 8-bit RGB.

    draft_size lets JPEGs decode at a reduced scale that keeps both sides at least that long.
    """
    with Image.open(path) as image:
        if draft_size:
            image.draft(None, (draft_size, draft_size))
        return to_rgb(ImageOps.exif_transpose(image))


def load_image(
    path: str | Path,
    resolution: int,
    *,
    random_crop: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """The square training image: shorter side resized to resolution (LANCZOS), then cropped.

    The crop is centred unless random_crop, which draws it from rng (default random.Random(0)). Mirroring
    is the LoRA trainer's (genkit.train.sampling: a seeded choice per item and epoch), not the loader's.
    """
    rng = rng or random.Random(0)
    image = open_rgb(path, draft_size=resolution)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if random_crop:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    else:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor (3, height, width) in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (height, width, 3)
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()
