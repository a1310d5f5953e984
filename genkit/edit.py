"""Pure helpers for editing an image with a diffusion model: strength, timesteps, masks.

img2img is SDEdit (Meng et al. 2021, https://arxiv.org/abs/2108.01073): noise the input to an
intermediate timestep and denoise from there. `strength` chooses the timestep the way diffusers'
img2img and inpaint pipelines do (`get_timesteps`): of the scheduler's `num_inference_steps`
timesteps, the last `int(num_inference_steps * strength)` are kept; 1.0 starts at the first
(the noisiest) timestep, small values stay close to the input.

Inpainting in pixel space re-imposes the known region after every step (RePaint, Lugmayr et al.
2022, https://arxiv.org/abs/2201.09865): the unmasked pixels of the sample are replaced by the input
noised to the next timestep; after the last step by the input itself, so they are the input's
pixels exactly.
"""

from __future__ import annotations

import math
import numbers

from genkit.errors import GenkitError

IMG2IMG_STRENGTH = 0.8  # diffusers' img2img default; chosen by benchmarks/edit_mini.py (docs/edit-mini.md)
INPAINT_STRENGTH = 1.0  # diffusers' inpaint default; chosen by benchmarks/edit_mini.py (docs/edit-mini.md)
INPAINT_NOISE = ("fixed", "fresh", "none")  # how the known region is noised between steps (see `reimpose`)


def default_strength(inpainting: bool) -> float:
    """The strength a call without one gets: as diffusers, img2img 0.8 and inpainting 1.0."""
    return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH


def check_strength(strength) -> float:
    """`strength` as a float in (0, 1]; anything else is a GenkitError naming it."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise GenkitError(f"strength must be a number in (0, 1], got {strength!r} (1 repaints from pure noise, "
                          "small values stay close to the input image; 0.8 is the default)")
    return float(strength)


def kept_steps(num_inference_steps: int, strength: float) -> int:
    """How many of the `num_inference_steps` denoising steps an edit of `strength` runs (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def strength_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The timesteps an edit of `strength` denoises through, after `scheduler.set_timesteps(num_inference_steps)`.

    As diffusers' `get_timesteps`: the last `int(num_inference_steps * strength)` timesteps, and the
    scheduler's begin index set to the first of them (multistep schedulers count their steps from it,
    and `add_noise` reads the noise level there). A strength that keeps no step is a GenkitError.
    """
    keep = kept_steps(num_inference_steps, strength)
    if keep < 1:
        steps = math.ceil(1 / strength)
        while kept_steps(steps, strength) < 1:
            steps += 1
        raise GenkitError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step "
                          f"(int({num_inference_steps} x {strength}) = 0); raise strength to at least "
                          f"{math.ceil(1000 / num_inference_steps) / 1000:g} or steps to at least {steps}")
    start = (num_inference_steps - keep) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]
