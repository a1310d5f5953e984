"""Input images for editing (img2img, inpainting, outpainting): read, fit, pad, hash.

Images are read with the same care as training images (`genkit.data.decode`): EXIF
orientation applied, 16-bit greyscale scaled (not clipped), palette, CMYK and greyscale converted,
transparency composited on white, files over Pillow's decompression-bomb limit refused. Every
problem is a `GenkitError` whose one line names the value and the fix.

Masks are white where the model repaints and black where it keeps the input, as in diffusers.
`read_mask` binarises at 128 (a value >= 128 repaints). A mask with transparency is composited on
black first, so strokes painted white on a transparent layer repaint and the transparent rest is
kept; `from_alpha=True` instead takes the transparent part of an image as the region to repaint
(the convention of image editors that cut a hole, and of OpenAI's edit endpoint).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from genkit import checks
from genkit.data import decode
from genkit.errors import GenkitError

FILLS = ("edge", "mean")  # outpaint's fills; an (r, g, b) tuple is also accepted
OUTPAINT_FILL = "mean"  # measured by benchmarks/edit_mini.py (docs/edit-mini.md)


# --- reading ------------------------------------------------------------------------------


def _describe(source) -> str:
    return f"{type(source).__module__}.{type(source).__qualname__}".removeprefix("builtins.")


def _open_path(source) -> Image.Image:
    """An upright, fully decoded image from a file, in its own mode; GenkitError when it cannot be used."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise GenkitError(f"image file {path} does not exist (check the path)")
    if path.is_dir():
        raise GenkitError(f"{path} is a folder; pass an image file (PNG, JPEG, WebP, ...)")
    try:
        return decode.open_image(path)  # training's reader and checks: unreadable, bomb, unsupported mode
    except decode.Unusable as exc:
        fix = {decode.SkipKind.UNREADABLE: "; pass a PNG, JPEG, WebP, BMP, GIF or TIFF file"}.get(exc.kind, "")
        raise GenkitError(f"cannot read image {path}: {exc.kind.value} ({exc.detail}){fix}") from None


def _check_pil(image: Image.Image, what: str) -> Image.Image:
    """Training's checks for an in-memory image: a mode it can convert, a size under the bomb limit."""
    if reason := decode.too_large(image.size):
        raise GenkitError(f"{what} of {reason}")
    if image.mode not in decode.SUPPORTED_MODES:
        raise GenkitError(f"{what} has pixel mode {image.mode}, which genkit cannot convert; convert it to RGB first")
    if image.width < 1 or image.height < 1:
        raise GenkitError(f"{what} is empty ({image.width}x{image.height})")
    return ImageOps.exif_transpose(image)


def _from_array(array: np.ndarray, what: str) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 arrays: uint8 (0-255), bool, or float in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise GenkitError(f"{what} is a numpy array of shape {array.shape}; pass HxWx3 (RGB), HxWx4 (RGBA) or HxW")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise GenkitError(f"{what} is a float array with values outside [0, 1] (min {np.nanmin(array):.3g}, "
                              f"max {np.nanmax(array):.3g}); scale it to [0, 1] or pass uint8")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise GenkitError(f"{what} is a numpy array of dtype {array.dtype}; pass uint8 (0-255) or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array))  # HxW -> L, HxWx3 -> RGB, HxWx4 -> RGBA


def _pil(source, what: str) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        return _open_path(source)
    if isinstance(source, Image.Image):
        return _check_pil(source, what)
    if isinstance(source, np.ndarray):
        return _from_array(source, what)
    raise GenkitError(f"{what} is a {_describe(source)}, not an image; pass a file path, a PIL image or a numpy array")


def read_image(source) -> Image.Image:
    """An 8-bit RGB PIL image from a path, a PIL image or a numpy array (HxWx3 uint8, or float in [0, 1]).

    Converted as training images are (`genkit.data.decode`): upright by EXIF, 16-bit scaled,
    transparency on white. The result is a new image; `source` is not changed.
    """
    image = _pil(source, "image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked above
        return decode.to_rgb(image).copy()


def read_mask(source, *, from_alpha: bool = False) -> Image.Image:
    """A binary mode-'L' mask (255 = repaint, 0 = keep) from a path, a PIL image or a numpy array.

    Any mode: greyscale value >= 128 repaints (RGB is converted to luminance, 16-bit scaled to 8 bits).
    Transparency is composited on black, so only what is painted (opaque and light) repaints.
    With `from_alpha`, the transparent part (alpha < 128) repaints instead, whatever the colours.
    Numpy arrays: HxW bool, uint8 or float in [0, 1] (HxWx3 and HxWx4 as for images).
    """
    image = _pil(source, "mask_image")
    has_alpha = decode.has_alpha(image)
    if from_alpha:
        if not has_alpha:
            raise GenkitError(f"mask_image has no transparency (mode {image.mode}) to read with from_alpha; "
                              "pass a mask painted white where to repaint instead")
        grey = Image.eval(image.convert("RGBA").getchannel("A"), lambda a: 255 - a)
    elif image.mode in decode.SIXTEEN_BIT_MODES:
        grey = decode.to_rgb(image).convert("L")
    elif has_alpha:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        grey = Image.alpha_composite(black, image.convert("RGBA")).convert("L")
    else:
        grey = image.convert("L")
    return grey.point(lambda v: 255 if v >= 128 else 0)


def sha256_of(source) -> str:
    """A hex SHA-256 for records: a path's file bytes (what `sha256sum` prints); an in-memory PIL
    image's mode, size and pixel bytes; a numpy array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source)).expanduser()
        if not path.is_file():
            raise GenkitError(f"image file {path} does not exist (check the path)")
        from genkit.files import file_sha256

        return file_sha256(path)
    elif isinstance(source, Image.Image):
        digest.update(f"{source.mode} {source.width}x{source.height}\n".encode())
        digest.update(source.tobytes())
    elif isinstance(source, np.ndarray):
        digest.update(f"{source.dtype.str} {'x'.join(map(str, source.shape))}\n".encode())
        digest.update(np.ascontiguousarray(source).tobytes())
    else:
        raise GenkitError(f"cannot hash a {_describe(source)}; pass a file path, a PIL image or a numpy array")
    return digest.hexdigest()


# --- sizing and padding ----------------------------------------------------------------------


def target_size(size: tuple[int, int], width: int | None, height: int | None, multiple: int) -> tuple[int, int]:
    """The (width, height) `fit_to_size` gives an input of `size` (see there)."""
    out = []
    for name, asked, own in (("width", width, size[0]), ("height", height, size[1])):
        if asked is None:
            if own < multiple:
                raise GenkitError(f"{name} {own} is under the model's size multiple {multiple}; "
                                  f"pass {name}= (a multiple of {multiple}) or a larger image", param="image")
            out.append(own // multiple * multiple)
        else:
            out.append(checks.check_multiple(name, asked, multiple))
    return out[0], out[1]


def fit_to_size(image: Image.Image, width: int | None = None, height: int | None = None, multiple: int = 8, *,
                resample=None) -> Image.Image:
    """The image resized to the model's canvas. One rule, as diffusers' image processor:

    each side becomes the requested `width` / `height` where one is given, else the input's own side
    rounded down to `multiple` (the model's size factor); the whole image is resized (never cropped)
    to that, with LANCZOS, or NEAREST for a mode-'L' or '1' mask (so it stays binary). An image
    already of that size is returned as it is (a copy).
    """
    size = target_size(image.size, width, height, multiple)
    if size == image.size:
        return image.copy()
    if resample is None:
        resample = Image.Resampling.NEAREST if image.mode in ("L", "1") else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def _fill_color(image: Image.Image, fill) -> tuple[int, ...]:
    if fill == "mean":
        return tuple(int(round(v)) for v in np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0))
    if isinstance(fill, (tuple, list)) and len(fill) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in fill):
        return tuple(fill)
    raise GenkitError(f"fill must be 'edge', 'mean' or an (r, g, b) tuple of 0-255 integers, got {fill!r}",
                      param="outpaint")


def outpaint(image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, fill=OUTPAINT_FILL
             ) -> tuple[Image.Image, Image.Image]:
    """(padded RGB image, mask): the canvas grown by the given pixels on each side, and a mode-'L' mask
    that is white (repaint) on the new border and black (keep) on the original.

    `fill` is what the new border holds before the model repaints it: "mean" (the image's mean colour,
    the default), "edge" (each border row or column replicates the nearest original pixel), or an
    (r, g, b) tuple. It matters only below strength 1: at 1 the border starts from almost pure noise.
    """
    image = read_image(image)
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in pads.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GenkitError(f"{name} must be a whole number of pixels >= 0, got {value!r}", param="outpaint")
    if not any(pads.values()):
        raise GenkitError("needs at least one of left, right, top, bottom > 0 (pixels to add)", param="outpaint")
    width, height = image.width + left + right, image.height + top + bottom
    if fill == "edge":
        pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
        padded = Image.fromarray(pixels)
    else:
        padded = Image.new("RGB", (width, height), _fill_color(image, fill))
        padded.paste(image, (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return padded, mask
