"""Opening images the one way genkit does: training data, edit inputs and the server's uploads.

`open_image` is the one reader: a file or an upload's bytes, refused before any pixel is decoded when it
is over Pillow's decompression-bomb limit (or a caller's side limit), then decoded whole, upright (EXIF
orientation), in its own pixel mode, refused if genkit cannot convert that mode (`Unusable`, a GenkitError
that says why). `inspect_image` is its cheap form for training's pre-flight scan (JPEGs decoded at
reduced scale); `to_rgb` makes 8-bit RGB of any supported mode (16-bit greyscale scaled, not clipped;
transparency composited on white); `open_rgb` is a file as training sees it, `load_image` the training
crop (a square, or an aspect-ratio bucket's size), `load_training_pair` the crop with its loss mask, and
`to_tensor` the [-1, 1] tensor the models take. `ALPHA_MODES` / `has_alpha` say
whether an image has transparency, for every reader and mask rule.
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from genkit.errors import GenkitError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr") + SIXTEEN_BIT_MODES
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # with an alpha band; see has_alpha for a transparent colour
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


class Unusable(GenkitError):
    """An image genkit cannot use: `kind` (a SkipKind) and `detail`, what went wrong and the fix where there is one.
    `over_side`: the image's size, when it is refused for a side over the caller's `max_side`."""

    def __init__(self, kind: SkipKind, detail: str, over_side: tuple[int, int] | None = None):
        super().__init__(f"{kind.value} ({detail})")
        self.kind, self.detail, self.over_side = kind, detail, over_side


def has_alpha(image: Image.Image) -> bool:
    """Whether the image has transparency: an alpha band, or a palette or greyscale image's transparent colour."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def open_image(source, *, formats=None, max_side: int | None = None, draft_size: int | None = None) -> Image.Image:
    """The one way genkit decodes an image: `source` is a file path or a binary file object (an upload's bytes in a
    BytesIO); `formats` limits the formats Pillow may try. Returns the whole image, decoded, upright by its EXIF
    orientation, in its own pixel mode (`to_rgb` makes RGB of it); raises `Unusable`: over Pillow's
    decompression-bomb limit or with a side over `max_side` (both told from the header, before any pixel is
    decoded), unreadable, or in a pixel mode genkit cannot convert. `draft_size` lets JPEGs decode at a reduced
    scale that keeps both sides at least that long."""
    with _decoded(source, formats, max_side, draft_size) as (image, _, _):
        return ImageOps.exif_transpose(image)


def inspect_image(path: Path) -> ImageInfo | Skipped:
    """Open and decode the image once, cheaply (as `open_image`, JPEGs at up to 1/8 scale); the reason it cannot be
    used, if any."""
    try:
        with _decoded(path, draft_size=64) as (image, (width, height), orientation):
            if orientation in (5, 6, 7, 8):  # rotated a quarter turn
                width, height = height, width
            return ImageInfo(width, height, image.mode)
    except Unusable as exc:
        return Skipped(path, exc.kind, exc.detail)


@contextlib.contextmanager
def _decoded(source, formats=None, max_side: int | None = None, draft_size: int | None = None):
    """(the decoded image, its size as stored, its EXIF orientation), the file open until the block ends; Unusable
    when it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # too_large says it, with the fix
            image = Image.open(source, formats=formats)
    except Exception as exc:  # Pillow raises many types for damaged files: OSError, SyntaxError, ValueError...
        raise _unreadable(source, exc) from None
    with image:
        size = image.size
        if reason := too_large(size):
            raise Unusable(SkipKind.TOO_LARGE, reason)
        if max_side is not None and max(size) > max_side:
            raise Unusable(SkipKind.TOO_LARGE, f"{size[0]}x{size[1]} pixels; at most {max_side} a side",
                           over_side=size)
        try:
            if draft_size:
                image.draft(None, (draft_size, draft_size))
            image.load()
            orientation = image.getexif().get(EXIF_ORIENTATION)
        except Exception as exc:
            raise _unreadable(source, exc) from None
        if image.mode not in SUPPORTED_MODES:
            raise Unusable(SkipKind.UNSUPPORTED, f"pixel mode {image.mode}; convert it to 8- or 16-bit PNG")
        yield image, size, orientation


def _unreadable(source, exc: Exception) -> Unusable:
    if isinstance(exc, Image.DecompressionBombError):
        return Unusable(SkipKind.TOO_LARGE, f"{exc}; raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file")
    if isinstance(exc, UnidentifiedImageError):
        empty = os.stat(source).st_size == 0 if isinstance(source, (str, os.PathLike)) else \
            source.getbuffer().nbytes == 0 if hasattr(source, "getbuffer") else False
        return Unusable(SkipKind.UNREADABLE, "empty file" if empty else "not an image Pillow recognises")
    return Unusable(SkipKind.UNREADABLE, f"{type(exc).__name__}: {exc}")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled (not clipped), transparency composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        # Mode "I" is what some Pillow paths give 16-bit files; its values are taken as 0..65535.
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if has_alpha(image):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # 1, L, P, CMYK, YCbCr


def open_rgb(path: str | Path, *, draft_size: int | None = None) -> Image.Image:
    """The whole image as training sees it before resizing: `open_image`'s, in 8-bit RGB.

    draft_size lets JPEGs decode at a reduced scale that keeps both sides at least that long.
    """
    return to_rgb(open_image(path, draft_size=draft_size))


def load_image(
    path: str | Path,
    resolution: int | tuple[int, int],
    *,
    random_crop: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """The training image: resized (LANCZOS) to cover `resolution` (a side, for a square, or (width, height) of an
    aspect-ratio bucket), then cropped to it.

    The crop is centred unless random_crop, which draws it from rng (default random.Random(0)). Mirroring
    is the LoRA trainer's (genkit.train.sampling: a seeded choice per item and epoch), not the loader's.
    """
    return load_training_pair(path, resolution, random_crop=random_crop, rng=rng)[0]


def load_training_pair(
    path: str | Path,
    resolution: int | tuple[int, int],
    *,
    mask: str | Path | None = None,
    random_crop: bool = False,
    rng: random.Random | None = None,
) -> tuple[Image.Image, Image.Image | None]:
    """The training image (as `load_image`) and its loss mask ("L", 255 where the loss counts), resized to the
    same size and cropped by the same box; None without a mask file. A mask of another size than its image is
    scaled onto it (the pre-flight scan refuses one of another shape)."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    rng = rng or random.Random(0)
    image = open_rgb(path, draft_size=max(width, height))
    scale = max(width / image.width, height / image.height)  # covers the target (the shorter side, for a square)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if random_crop:
        left, top = rng.randint(0, size[0] - width), rng.randint(0, size[1] - height)
    else:
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
    box = (left, top, left + width, top + height)
    if mask is None:
        return image.crop(box), None
    weights = to_rgb(open_image(mask)).convert("L")
    if weights.size != size:
        weights = weights.resize(size, Image.Resampling.BILINEAR)
    return image.crop(box), weights.crop(box)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor (3, height, width) in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # (height, width, 3)
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()
