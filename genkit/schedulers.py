"""Samplers by short name, each built from the model's own scheduler config.

The config carries what the model was trained with (beta schedule, prediction type); the
overrides only choose how to sample. `clip_sample` is always off: clipping the predicted
clean image to [-1, 1] wrecks samples at guidance >= 2 (measured on genkit-mini, see
shared/PROBES.md), and no latent-space model wants it either.
"""

from __future__ import annotations

from enum import Enum

from genkit.errors import GenkitError


class Sampler(str, Enum):
    DDIM = "ddim"
    EULER = "euler"
    EULER_A = "euler-a"
    DPMPP = "dpm++"
    UNIPC = "unipc"
    DDPM = "ddpm"


# short name -> (diffusers class name, overrides, A1111's name for the infotext "Sampler:" field)
_TABLE = {
    Sampler.DDIM: ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, "DDIM"),
    Sampler.EULER: ("EulerDiscreteScheduler", {}, "Euler"),
    Sampler.EULER_A: ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    Sampler.DPMPP: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    Sampler.UNIPC: ("UniPCMultistepScheduler", {}, "UniPC"),
    Sampler.DDPM: ("DDPMScheduler", {"clip_sample": False}, "DDPM"),
}
ALIASES = {"dpmpp": Sampler.DPMPP, "dpm++ 2m": Sampler.DPMPP, "dpm++2m": Sampler.DPMPP, "euler a": Sampler.EULER_A,
           "euler_a": Sampler.EULER_A, "k_euler": Sampler.EULER, "k_euler_a": Sampler.EULER_A}
NAMES = tuple(s.value for s in Sampler)


def parse(name: str | Sampler) -> Sampler:
    if isinstance(name, Sampler):
        return name
    key = str(name).strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    for sampler in Sampler:
        if key == sampler.value or key == _TABLE[sampler][2].lower():
            return sampler
    raise GenkitError(f"unknown scheduler {name!r} (valid: {', '.join(NAMES)})")


def a1111_name(name: str | Sampler) -> str:
    return _TABLE[parse(name)][2]


def _euler_ancestral_float64():
    """Euler a with sigmas in float64.

    Under a cosine schedule the first sigma is about 2e4; in float32, sigma_from**2 - sigma_to**2
    rounds so that sigma_up > sigma_to and sigma_down = sqrt(negative) is NaN on every image
    (seen on genkit-mini). The step's arithmetic on 0-dim float64 sigmas keeps the samples in
    their own dtype, so nothing else changes.
    """
    from diffusers import EulerAncestralDiscreteScheduler

    class EulerAncestralFloat64(EulerAncestralDiscreteScheduler):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.sigmas = self.sigmas.double()

    return EulerAncestralFloat64


def build(name: str | Sampler, base_config):
    """A fresh scheduler of kind `name` from `base_config` (a scheduler's `.config`)."""
    import diffusers

    sampler = parse(name)
    class_name, overrides, _ = _TABLE[sampler]
    cls = _euler_ancestral_float64() if sampler is Sampler.EULER_A else getattr(diffusers, class_name)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    config.update(timestep_spacing="trailing", **overrides)  # trailing: https://arxiv.org/abs/2305.08891
    return cls.from_config(config)
