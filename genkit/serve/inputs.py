"""Input images of edit requests (A1111 img2img, OpenAI edits): decoded, bounded, masks read per dialect.

Every function raises `ApiError` naming the request's field; nothing here touches the file system.

- `decode_base64(text, field)`: A1111's base64 PNG/JPEG/WebP, a `data:image/...;base64,` prefix allowed.
- `decode_bytes(data, field)`: an uploaded file (OpenAI's multipart `image`, `mask`).
- `a1111_mask(image, invert)`: white repaints, as A1111 reads it: an RGBA mask that is not fully opaque
  repaints where it is opaque (A1111's `create_binary_mask`), anything else by luminance >= 128.
- `openai_mask(image, field)`: transparent pixels (alpha < 128) repaint, OpenAI's convention.

The size is checked from the file's header before the pixels are decoded, so a small file that
claims a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import re
from io import BytesIO

from genkit.serve.errors import ApiError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # never a format Pillow hands to another program (EPS)
DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str, field: str, max_side: int):
    data = DATA_URL.sub("", text.strip(), count=1)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not base64 (send a PNG or JPEG file's bytes as base64, a data: URL prefix "
                            "is allowed)", param=field) from None
    return decode_bytes(raw, field, max_side, status=422)


def decode_bytes(raw: bytes, field: str, max_side: int, *, status: int = 400):
    """genkit's one image reader (`genkit.data.decode.open_image`: upright by EXIF, bomb and size told from the
    header) on an upload's bytes, its refusals in the request's words."""
    from genkit.data import decode

    if not raw:
        raise ApiError(status, f"{field}: the image is empty", param=field)
    try:
        image = decode.open_image(BytesIO(raw), formats=FORMATS, max_side=max_side)
    except decode.Unusable as exc:
        if exc.over_side:
            width, height = exc.over_side
            raise ApiError(status, f"{field}: the image is {width}x{height}; this server reads input images at most "
                                   f"{max_side} pixels wide and high", param=field, code="limit") from None
        if exc.kind is decode.SkipKind.UNSUPPORTED:
            raise ApiError(status, f"{field}: the image has {exc.detail}", param=field) from None
        raise ApiError(status, f"{field}: not an image genkit can read (send a PNG, JPEG or WebP file)",
                       param=field) from None
    if image.width < 1 or image.height < 1:
        raise ApiError(status, f"{field}: the image is empty ({image.width}x{image.height})", param=field)
    return image


def a1111_mask(image, *, invert: bool):
    """A binary mode-'L' mask (255 repaints) from an A1111 `mask`, flipped for `inpainting_mask_invert` 1."""
    from PIL import ImageOps

    from genkit import images

    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        mask = image.getchannel("A").point(lambda a: 255 if a > 128 else 0)  # A1111: the painted (opaque) part
    else:
        mask = images.read_mask(image)
    return ImageOps.invert(mask) if invert else mask


def openai_mask(image, field: str, *, status: int = 400):
    """A binary mode-'L' mask (255 repaints) from an image's transparency (OpenAI's mask convention)."""
    from genkit import images
    from genkit.data.decode import has_alpha

    if not has_alpha(image):
        raise ApiError(status, f"{field}: the mask has no transparency (mode {image.mode}); send a PNG whose "
                               "transparent pixels mark the region to edit", param=field)
    return images.read_mask(image, from_alpha=True)


def is_transparent_somewhere(image) -> bool:
    """Whether an image has pixels with alpha < 128 (OpenAI: without a mask, those are the region to edit)."""
    from genkit.data.decode import has_alpha

    if not has_alpha(image):
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 128


def check_mask(mask, image, field: str, status: int, *, convention: str = "white") -> None:
    """genkit's one mask check (`genkit.edit.check_mask`: the image's size, something but not everything to repaint)
    in the request's words: `convention` "white" for A1111's masks, "transparent" for OpenAI's."""
    from genkit import edit
    from genkit.errors import GenkitError

    try:
        edit.check_mask(mask, image.size, convention=convention)
    except GenkitError as exc:
        raise ApiError(status, exc.naming(field), param=field) from None
