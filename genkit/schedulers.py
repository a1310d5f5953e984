"""Samplers by short name, each built from the model's own scheduler config.

The config carries what the model was trained with (beta schedule, prediction type); the
overrides only choose how to sample. `clip_sample` is always off: clipping the predicted
clean image to [-1, 1] wrecks samples at guidance >= 2 (measured on genkit-mini, see
shared/PROBES.md), and no latent-space model wants it either.
"""

from __future__ import annotations

import copy
import functools
import json
from enum import Enum

from genkit.errors import GenkitError


class Sampler(str, Enum):
    DDIM = "ddim"
    EULER = "euler"
    EULER_A = "euler-a"
    DPMPP = "dpm++"
    UNIPC = "unipc"
    DDPM = "ddpm"
    FLOW_EULER = "flow-euler"  # flow matching (SD3, Flux, SANA): the sampler the models were released with
    FLOW_HEUN = "flow-heun"
    FLOW_DPMPP = "flow-dpm++"
    FLOW_UNIPC = "flow-unipc"


# short name -> (diffusers class name, overrides, A1111's name for the infotext "Sampler:" field)
_TABLE = {
    Sampler.DDIM: ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, "DDIM"),
    Sampler.EULER: ("EulerDiscreteScheduler", {}, "Euler"),
    Sampler.EULER_A: ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    Sampler.DPMPP: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    Sampler.UNIPC: ("UniPCMultistepScheduler", {}, "UniPC"),
    Sampler.DDPM: ("DDPMScheduler", {"clip_sample": False}, "DDPM"),
    Sampler.FLOW_EULER: ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
    Sampler.FLOW_HEUN: ("FlowMatchHeunDiscreteScheduler", {}, "Heun"),
    Sampler.FLOW_DPMPP: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    Sampler.FLOW_UNIPC: ("UniPCMultistepScheduler", {}, "UniPC"),
}
FLOW = (Sampler.FLOW_EULER, Sampler.FLOW_HEUN, Sampler.FLOW_DPMPP, Sampler.FLOW_UNIPC)
# the same method for the other kind of model: `--scheduler euler` on Flux means flow-euler
_COUNTERPART = {Sampler.EULER: Sampler.FLOW_EULER, Sampler.DPMPP: Sampler.FLOW_DPMPP, Sampler.UNIPC: Sampler.FLOW_UNIPC}
ALIASES = {"dpmpp": Sampler.DPMPP, "dpm++ 2m": Sampler.DPMPP, "dpm++2m": Sampler.DPMPP, "euler a": Sampler.EULER_A,
           "euler_a": Sampler.EULER_A, "k_euler": Sampler.EULER, "k_euler_a": Sampler.EULER_A}
NAMES = tuple(s.value for s in Sampler)


def parse(name: str | Sampler, flow: bool | None = None) -> Sampler:
    """The sampler called `name`; with `flow` given, the variant for that kind of model (or a one-line error)."""
    sampler = name if isinstance(name, Sampler) else _lookup(name)
    if flow is None or (sampler in FLOW) == flow:
        return sampler
    if flow and sampler in _COUNTERPART:
        return _COUNTERPART[sampler]
    if not flow and sampler in _COUNTERPART.values():
        return next(k for k, v in _COUNTERPART.items() if v is sampler)
    kind = "flow-matching models (SD3, Flux, SANA)" if flow else "noise-prediction models (SD, SDXL, PixArt, genkit-mini)"
    valid = [s.value for s in Sampler if (s in FLOW) == flow]
    asked = str(name.value if isinstance(name, Sampler) else name)
    also = "" if asked.strip().lower() == sampler.value else f" ({sampler.value})"
    raise GenkitError(f"{asked!r}{also} does not fit {kind} (valid: {', '.join(valid)}, default)", param="scheduler")


def _lookup(name: str) -> Sampler:
    key = str(name).strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    for sampler in Sampler:
        if key == sampler.value or key == _TABLE[sampler][2].lower():
            return sampler
    raise GenkitError(f"{name!r} is not a sampler genkit knows (valid: {', '.join(NAMES)}, default)", param="scheduler")


def a1111_name(name: str | Sampler) -> str:
    return _TABLE[parse(name)][2]


@functools.lru_cache(maxsize=None)  # one class: fresh() keys its prototypes by class
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
    if sampler in FLOW:
        return fresh(cls, _flow_config(sampler, dict(base_config), overrides))
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    config.update(timestep_spacing="trailing", **overrides)  # trailing: https://arxiv.org/abs/2305.08891
    return fresh(cls, config)


_PROTOTYPES: dict = {}  # (class, config as JSON) -> a scheduler never used: its copies are fresh ones
_MAX_PROTOTYPES = 64


def fresh(cls, config) -> object:
    """A new scheduler of class `cls` from `config`, as `cls.from_config(config)` makes it (every batch needs its own:
    schedulers keep per-call state), copied from one made once: diffusers' from_config checks the config against
    __init__'s signature every time (0.6-1.3 ms on a 2-core CPU), a copy takes 0.1-0.25 ms."""
    key = (cls, json.dumps(dict(config), sort_keys=True, default=repr))
    prototype = _PROTOTYPES.get(key)
    if prototype is None:
        if len(_PROTOTYPES) >= _MAX_PROTOTYPES:
            _PROTOTYPES.clear()
        prototype = _PROTOTYPES[key] = cls.from_config(config)
    return copy.deepcopy(prototype)


def _flow_config(sampler: Sampler, base: dict, overrides: dict) -> dict:
    """A flow-matching sampler's config from the model's (FlowMatchEuler's `shift` or DPM/UniPC's `flow_shift`)."""
    shift = base.get("shift", base.get("flow_shift", 1.0))
    config = {"num_train_timesteps": base.get("num_train_timesteps", 1000)}
    if sampler in (Sampler.FLOW_EULER, Sampler.FLOW_HEUN):
        config["shift"] = shift
        if sampler is Sampler.FLOW_EULER:
            config.update({k: base[k] for k in ("use_dynamic_shifting", "base_shift", "max_shift",
                                                 "base_image_seq_len", "max_image_seq_len") if k in base})
        return config
    return {**config, **overrides, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": shift,
            "use_dynamic_shifting": base.get("use_dynamic_shifting", False)}
