"""The hires fix, as AUTOMATIC1111 does it: make the image at its size, upscale it, then redraw it large.

A1111's "Hires. fix" (`enable_hr`): a first pass at width x height, an upscale by `hires_scale`, and a second pass
that is image-to-image at `hires_strength` (A1111's "Denoising strength") over the upscaled picture. The second pass
is the family's own img2img pipeline (genkit.edit's, made with diffusers' `from_pipe`), run on the same prompt with
each image's own generator, which goes on from where the first pass left it: image i still depends only on its
prompt and seed, never on its batch-mates.

Upscalers (`hires_upscaler`):
- "latent" (the default, A1111's "Latent"): the first pass's latents, bilinearly resized (the family's
  `hires_latents`), are the second pass's start; nothing is decoded in between;
- "lanczos": the first pass's pixels resized with PIL's LANCZOS, encoded again by the img2img pipeline;
- a FILE: an upscaling model (ESRGAN, Real-ESRGAN, SwinIR, ... as .safetensors or .pth) loaded with spandrel
  (`pip install 'genkit[upscale]'`), run on the first pass's pixels, resized to the target with LANCZOS.

The output is `hires_scale` times the size, each side rounded to the model's size multiple (`size`). The second
pass has `hires_steps` steps (0: the first pass's), of which it runs int(steps x strength) as every genkit
image-to-image does (A1111 instead stretches the schedule so all of them run). Defaults: A1111's hires slider,
0.7 strength; its API's 0.75 is what `genkit serve`'s A1111 dialect keeps.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from pathlib import Path

from genkit.errors import GenkitError, term

STRENGTH = 0.7  # A1111's "Denoising strength" default for the hires fix (its UI's slider)
UPSCALER = "latent"
UPSCALERS = ("latent", "lanczos")  # the built-in ones; anything else is an upscaling model's file
MAX_SCALE = 8.0
MODEL_SUFFIXES = (".safetensors", ".pth")  # what spandrel reads without running pickled code (.pth: restricted)
EXTRA = "upscale"


def check_scale(scale) -> float:
    """`scale` as a float in [1, MAX_SCALE]; anything else is a GenkitError naming it."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) \
            or not 1 <= scale <= MAX_SCALE:
        raise GenkitError(f"must be a factor from 1 to {MAX_SCALE:g}, got {scale!r} (2 doubles width and height)",
                          param="hires_scale")
    return float(scale)


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise GenkitError(f"must be a number in (0, 1], got {strength!r} (how much of the upscaled image the second "
                          f"pass redraws; {STRENGTH} is the default)", param="hires_strength")
    return float(strength)


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise GenkitError(f"must be a whole number >= 0, got {steps!r} (0: as many as the first pass)",
                          param="hires_steps")
    from genkit import checks

    if steps > checks.max_steps():
        raise GenkitError(f"must be at most {checks.max_steps()}, got {steps} (set GENKIT_MAX_STEPS to raise the limit)",
                          param="hires_steps")
    return steps


def check_upscaler(upscaler) -> str:
    """"latent", "lanczos" (any case), or an existing upscaling model file, with spandrel installed."""
    if upscaler is None:
        return UPSCALER
    if not isinstance(upscaler, str) or not upscaler.strip():
        raise GenkitError(f"must be latent, lanczos or an upscaling model's file, got {upscaler!r}",
                          param="hires_upscaler")
    if upscaler.strip().lower() in UPSCALERS:
        return upscaler.strip().lower()
    path = Path(upscaler).expanduser()
    if not path.is_file():
        raise GenkitError(f"{upscaler}: no such upscaler (latent, lanczos, or an upscaling model file such as "
                          "4x-UltraSharp.safetensors)", param="hires_upscaler")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise GenkitError(f"{upscaler}: an upscaling model must be a {' or '.join(MODEL_SUFFIXES)} file",
                          param="hires_upscaler")
    _require_spandrel(upscaler)
    return os.fspath(upscaler)


def _require_spandrel(upscaler: str) -> None:
    try:
        import spandrel  # noqa: F401
    except ImportError as exc:
        raise GenkitError(f"{upscaler}: an upscaling model file needs spandrel: pip install 'genkit[{EXTRA}]' "
                          f"({exc}); or use latent or lanczos", param="hires_upscaler") from None


def check_steps_kept(steps: int, strength: float) -> None:
    """The second pass must run at least one step: int(steps x strength) >= 1."""
    from genkit import edit

    if edit.kept_steps(steps, strength) < 1:
        raise GenkitError(f"{strength} with {steps} steps leaves the second pass no step (int({steps} x {strength}) "
                          f"= 0); raise {term('hires_strength')} or {term('hires_steps')}", param="hires_strength")


def size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """The output size: each side times `scale`, rounded to the nearest multiple of `multiple` (halves up; at least
    one multiple)."""
    return tuple(max(multiple, math.floor(side * scale / multiple + 0.5) * multiple) for side in (width, height))


def second_steps(job) -> int:
    """The second pass's num_inference_steps (0 in hires_steps: the first pass's)."""
    return job.hires_steps or job.num_inference_steps


# --- upscaling pixels -----------------------------------------------------------------------------------------------
_MODELS: dict = {}  # (path, mtime, device) -> spandrel's ImageModelDescriptor, loaded once per process
_LOCK = threading.Lock()


def upscale(images: list, upscaler: str, width: int, height: int, device: str = "cpu") -> list:
    """PIL images resized to width x height: with LANCZOS, or by an upscaling model and then LANCZOS to the size."""
    from PIL import Image

    if upscaler != "lanczos":
        images = _model_upscale(images, upscaler, device)
    return [image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
            for image in images]


def _model_upscale(images: list, path: str, device: str) -> list:
    import numpy as np
    import torch
    from PIL import Image

    model = _model(path, device)
    out = []
    with torch.no_grad():
        for image in images:  # one at a time: an image's pixels never depend on its batch-mates
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            result = model(pixels[None].to(device)).clamp(0, 1)[0]
            out.append(Image.fromarray((result.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)))
    return out


def _model(path: str, device: str):
    _require_spandrel(path)
    from spandrel import ImageModelDescriptor, ModelLoader

    key = (os.path.abspath(path), os.stat(path).st_mtime_ns, device)
    with _LOCK:
        if key not in _MODELS:
            try:
                model = ModelLoader(device="cpu").load_from_file(path)
            except Exception as exc:  # spandrel's UnsupportedModelError, a damaged file, ...
                why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise GenkitError(f"{path}: spandrel cannot read it as an upscaling model ({why})",
                                  param="hires_upscaler") from None
            if not isinstance(model, ImageModelDescriptor) or model.input_channels != 3 or model.output_channels != 3:
                raise GenkitError(f"{path}: not an RGB image-to-image upscaling model (spandrel reads it as "
                                  f"{type(model).__name__})", param="hires_upscaler")
            _MODELS[key] = model.to(device).eval()
        return _MODELS[key]
