"""Pure helpers for editing an image with a diffusion model: strength, timesteps, masks.

img2img is SDEdit (Meng et al. 2021, https://arxiv.org/abs/2108.01073): noise the input to an
intermediate timestep and denoise from there. `strength` chooses the timestep the way diffusers'
img2img and inpaint pipelines do (`get_timesteps`): of the scheduler's `num_inference_steps`
timesteps, the last `int(num_inference_steps * strength)` are kept; 1.0 starts at the first
(the noisiest) timestep, small values stay close to the input.

Inpainting in pixel space re-imposes the known region after every step (RePaint, Lugmayr et al.
2022, https://arxiv.org/abs/2201.09865): the unmasked pixels of the sample are replaced by the input
noised to the next timestep; after the last step by the input itself, so they are the input's
pixels exactly. The defaults below were chosen by benchmarks/edit_mini.py (docs/edit-mini.md).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from genkit.errors import GenkitError

IMG2IMG_STRENGTH = 0.8  # diffusers' img2img default; chosen by benchmarks/edit_mini.py (docs/edit-mini.md)
INPAINT_STRENGTH = 1.0  # diffusers' inpaint default; chosen by benchmarks/edit_mini.py (docs/edit-mini.md)
# How inpainting noises the known region after each step (GenkitMiniPipeline.inpaint_noise):
# "fresh": a new draw of q(x_t | x_0) from the image's own generator (RePaint), the default;
# "fixed": the noise the image started from, again at each level (diffusers' inpaint pipelines for 4-channel UNets);
# "none": not re-imposed between steps, only pasted back at the end (img2img plus a paste; a visible seam).
INPAINT_NOISE = ("fresh", "fixed", "none")
INPAINT_RESAMPLE = 1  # passes per step (RePaint's resampling r); 2 doubles the denoising time


def default_strength(inpainting: bool) -> float:
    """The strength a call without one gets: as diffusers, img2img 0.8 and inpainting 1.0."""
    return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH


def check_strength(strength) -> float:
    """`strength` as a float in (0, 1]; anything else is a GenkitError naming it."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise GenkitError(f"must be a number in (0, 1], got {strength!r} (1 repaints from pure noise, "
                          "small values stay close to the input image; 0.8 is the default)", param="strength")
    return float(strength)


def kept_steps(num_inference_steps: int, strength: float) -> int:
    """How many of the `num_inference_steps` denoising steps an edit of `strength` runs (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def check_kept_steps(num_inference_steps: int, strength: float) -> None:
    """A GenkitError when an edit of `strength` with `num_inference_steps` steps would run none."""
    if kept_steps(num_inference_steps, strength) >= 1:
        return
    steps = math.ceil(1 / strength)
    while kept_steps(steps, strength) < 1:
        steps += 1
    raise GenkitError(f"{strength} with {num_inference_steps} steps leaves no denoising step "
                      f"(int({num_inference_steps} x {strength}) = 0); raise strength to at least "
                      f"{math.ceil(1000 / num_inference_steps) / 1000:g} or steps to at least {steps}",
                      param="strength")


def strength_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The timesteps an edit of `strength` denoises through, after `scheduler.set_timesteps(num_inference_steps)`.

    As diffusers' `get_timesteps`: the last `int(num_inference_steps * strength)` timesteps, and the
    scheduler's begin index set to the first of them (multistep schedulers count their steps from it,
    and `add_noise` reads the noise level there). A strength that keeps no step is a GenkitError.
    """
    check_kept_steps(num_inference_steps, strength)
    keep = kept_steps(num_inference_steps, strength)
    start = (num_inference_steps - keep) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


# --- the engine's inputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    """An input image or mask as a run holds it: where it was read from, its hash, its pixels (PIL)."""

    source: str  # the path as given, or "<PIL image>" / "<numpy array>" for in-memory inputs
    sha256: str  # genkit.images.sha256_of: a file's bytes, or an in-memory image's pixels
    pixels: Any = field(compare=False, repr=False, hash=False)


@dataclass(frozen=True)
class Pictures:
    """Several input images read together, in order: an instruction edit's (genkit.families' "instruct" task). A record
    lists their sources and sha256s where one image's record holds a string."""

    items: tuple[Picture, ...]

    @property
    def source(self) -> list[str]:
        return [item.source for item in self.items]

    @property
    def sha256(self) -> list[str]:
        return [item.sha256 for item in self.items]


def references(image: "Picture | Pictures") -> list[Picture]:
    """The input images of a job's `image`: one, or each of several."""
    return list(image.items) if isinstance(image, Pictures) else [image]


def picture(source, what: str, cache: dict | None = None) -> "Picture | Pictures":
    """Read an input image (`what` "image") or mask ("mask") once per run; GenkitError naming it if unusable. A list
    of several images (an instruction edit's) is read into Pictures; a list of one is that image."""
    from genkit import images

    if isinstance(source, (list, tuple)) and what == "image":
        if not source:
            raise GenkitError("is an empty list (give one input image, or several for an instruction edit)",
                              param="image")
        read = tuple(picture(one, what, cache) for one in source)
        return read[0] if len(read) == 1 else Pictures(read)

    key = (what, os.fspath(source) if isinstance(source, (str, os.PathLike)) else id(source))
    if cache is not None and key in cache:
        return cache[key]
    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
    else:
        label = "<numpy array>" if type(source).__module__ == "numpy" else "<PIL image>"
    try:
        pixels = images.read_mask(source) if what == "mask" else images.read_image(source)
    except GenkitError as exc:
        raise GenkitError(f"{label}: {exc}", param=what) from None
    found = Picture(label, images.sha256_of(source), pixels)
    if cache is not None:
        cache[key] = found
    return found


def check_mask(mask, image_size: tuple[int, int], *, param: str = "mask", which: str | None = None,
               convention: str = "white") -> None:
    """The one mask check, for every caller (genkit generate and the engine, genkit-mini's pipeline, the server's
    A1111 and OpenAI routes): a mask has its image's size and repaints something but not everything.

    `mask`: a Picture or a binary mode-'L' PIL mask (255 repaints). The GenkitError is about `param` and names the
    mask `which` after it (default: a Picture's source). `convention` is how the mask's maker marks what repaints,
    for the fix the error suggests: "white" (genkit's and A1111's masks) or "transparent" (OpenAI's). genkit-mini's
    pipeline, which measures what a mask repaints after resizing it, calls the two rules alone (check_mask_size,
    check_coverage)."""
    pixels = mask.pixels if isinstance(mask, Picture) else mask
    if which is None:
        which = mask.source if isinstance(mask, Picture) else ""
    check_mask_size(pixels.size, image_size, param=param, which=which, convention=convention)
    low, high = pixels.getextrema()
    check_coverage(0.0 if high == 0 else 1.0 if low == 255 else 0.5, param=param, which=which, convention=convention)


_MASK_WORDS = {  # convention -> (how it marks repaint and keep, nothing to repaint, everything repainted)
    "white": ("white repaints, black keeps", "is all black: nothing to repaint (paint white where the image should "
              "change)", "is all white: it repaints the whole image (drop the mask for image-to-image, or paint "
              "black what should stay)"),
    "transparent": ("transparent repaints, opaque keeps", "is all opaque: nothing to repaint (make transparent where "
                    "the image should change)", "is all transparent: it repaints the whole image (drop the mask for "
                    "image-to-image, or keep opaque what should stay)"),
}


def check_mask_size(size: tuple[int, int], image_size: tuple[int, int], *, param: str = "mask", which: str = "",
                    convention: str = "white") -> None:
    """check_mask's first rule: the mask (`size`, before any resizing) has its image's size."""
    if tuple(size) != tuple(image_size):
        raise GenkitError(f"{which} is {size[0]}x{size[1]} but the image is {image_size[0]}x{image_size[1]} (pass a "
                          f"mask of the image's size; {_MASK_WORDS[convention][0]})".lstrip(), param=param)


def check_coverage(share: float, *, param: str = "mask", which: str = "", convention: str = "white") -> None:
    """check_mask's second rule: the mask repaints something and keeps something (`share`: the part it repaints)."""
    if share in (0, 1):
        raise GenkitError(f"{which} {_MASK_WORDS[convention][1 if share == 0 else 2]}".lstrip(), param=param)


SIDES = ("left", "right", "top", "bottom")


def parse_outpaint(value) -> dict[str, int]:
    """"left=16,right=16" (or a dict) -> {"left": 16, "right": 16, "top": 0, "bottom": 0}; a bare "16" pads all
    four sides. GenkitError naming the part that is wrong."""
    if isinstance(value, dict):
        parts = dict(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            parts = {side: int(text) for side in SIDES}
        else:
            parts = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                side, sep, amount = part.partition("=")
                if not sep or not amount.strip().isdigit():
                    raise GenkitError(f"{value!r}: {part!r} is not SIDE=PIXELS (e.g. left=16,right=16)",
                                      param="outpaint")
                parts[side.strip()] = int(amount)
    else:
        raise GenkitError(f"{value!r} must be a string like 'left=16,right=16' or a dict of sides", param="outpaint")
    unknown = sorted(set(parts) - set(SIDES))
    if unknown:
        raise GenkitError(f"{value!r}: unknown side {unknown[0]!r} (sides: {', '.join(SIDES)})", param="outpaint")
    pads = {side: parts.get(side, 0) for side in SIDES}
    for side, amount in pads.items():
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise GenkitError(f"{side} must be a whole number of pixels >= 0, got {amount!r}", param="outpaint")
    if not any(pads.values()):
        raise GenkitError(f"{value!r} adds nothing (give at least one side > 0, e.g. right=16)", param="outpaint")
    return pads


def outpaint_text(pads: dict[str, int]) -> str:
    """The record's form of an outpaint: "left=16,right=16" (sides with pixels, in a fixed order)."""
    return ",".join(f"{side}={pads[side]}" for side in SIDES if pads[side])


def inputs_for(image: Picture, mask: Picture | None, outpaint: str | None, width: int, height: int, multiple: int):
    """(image, mask or None) as the model takes them: outpainting's padding and mask, then resized to width x height
    (genkit.images.fit_to_size)."""
    from genkit import images

    pixels, mask_pixels = image.pixels, mask.pixels if mask is not None else None
    if outpaint:
        pixels, mask_pixels = images.outpaint(pixels, **parse_outpaint(outpaint))
    fitted = images.fit_to_size(pixels, width, height, multiple)
    return fitted, (images.fit_to_size(mask_pixels, width, height, multiple) if mask_pixels is not None else None)
