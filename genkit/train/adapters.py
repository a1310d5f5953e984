"""The LoRA trainer's adapters: added with peft (LoRA, DoRA, LoKr or LoHa; each starts as a zero update, so step 0
is the base model), their trained parameters, an exponential moving average of them, the state dicts as diffusers'
training scripts save them for each family, and the NaN check."""

from __future__ import annotations

import contextlib

import torch

from genkit.errors import GenkitError, term
from genkit.lora import diffusers_layout
from genkit.train.recipe import AdapterConfig, AdapterKind


def peft_config(cfg: AdapterConfig, targets):
    """peft's config for `lora.adapter`: LoraConfig (B starts at zero; DoRA with `lora.dora`), LoKrConfig or
    LoHaConfig (one factor starts at zero: peft's init_weights)."""
    kind = AdapterKind(cfg.adapter)
    if kind is AdapterKind.LOKR:
        from peft import LoKrConfig

        return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=list(targets))
    if kind is AdapterKind.LOHA:
        from peft import LoHaConfig

        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=list(targets))
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                      target_modules=list(targets), use_dora=cfg.dora)


def add(pipe, family, cfg: AdapterConfig) -> list[tuple[str, torch.nn.Module]]:
    """Add the adapters (a zero update at first, so step 0 is the base model); returns the trained modules."""
    trained = [(family.denoiser_name, family.denoiser(pipe))]
    if cfg.text_encoder:
        trained.append(("text_encoder", pipe.text_encoder))
    for name, module in trained:
        targets = cfg.text_encoder_target_modules if name == "text_encoder" else cfg.target_modules
        config = peft_config(cfg, targets)
        try:
            if name == family.denoiser_name:
                family.add_adapter(module, config)
            else:
                module.add_adapter(config)
        except ValueError as exc:
            raise GenkitError(f"lora.target_modules: {str(exc).splitlines()[0][:200]}") from None
    return trained


def params(trained) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{key}": p for name, module in trained for key, p in module.named_parameters() if p.requires_grad}


def layers(trained, family) -> dict:
    """{component: state dict} of the adapters as diffusers' training scripts save them for this family: UNet
    families in diffusers' layout (feed-forward and convolution adapters renamed too, see genkit.lora._LAYOUTS; DoRA's
    magnitudes keep peft's `lora_magnitude_vector`), transformers in peft's; LoKr and LoHa in peft's everywhere
    (`lokr_w1`, `hada_w1_a`, ...: diffusers' layouts have no names for them)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layout(name, module, state):
        lora = str(module.peft_config["default"].peft_type.value) == "LORA"
        if not lora or (family.lora_layout == "peft" and name == family.denoiser_name):
            return state
        return diffusers_layout(convert_state_dict_to_diffusers(state))

    return {name: layout(name, module, get_peft_model_state_dict(module)) for name, module in trained}


class Ema:
    """An exponential moving average of the trained adapter weights: diffusers' `EMAModel` (decay (1 + n) / (10 + n)
    after n updates, capped at `decay`; the first update copies the weights), one update per optimizer step. Its
    weights are what a run exports and samples its validation grids with; checkpoints hold them beside the raw ones."""

    def __init__(self, params: dict, decay: float):
        from diffusers.training_utils import EMAModel

        self.names = list(params)
        self.model = EMAModel(list(params.values()), decay=decay)

    def step(self, params: dict) -> None:
        self.model.step([params[name] for name in self.names])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: shadow.detach() for name, shadow in zip(self.names, self.model.shadow_params)}

    @property
    def updates(self) -> int:
        return self.model.optimization_step

    def load(self, tensors: dict, updates: int) -> None:
        """Continue from a checkpoint's averages (`tensors`, `updates` done)."""
        if set(tensors) != set(self.names):
            raise GenkitError("the checkpoint's EMA holds other adapter layers than this recipe makes", param="resume")
        with torch.no_grad():
            for shadow, name in zip(self.model.shadow_params, self.names):
                shadow.copy_(tensors[name])
        self.model.optimization_step = updates

    def copy_to(self, params: dict) -> None:
        self.model.copy_to([params[name] for name in self.names])

    @contextlib.contextmanager
    def applied(self, params: dict):
        """The averaged weights in place of the trained ones for a while (a validation grid), then those back."""
        ordered = [params[name] for name in self.names]
        self.model.store(ordered)
        self.model.copy_to(ordered)
        try:
            yield
        finally:
            self.model.restore(ordered)


def check_finite(params: dict, step: int) -> None:
    bad = next((name for name, p in params.items() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise GenkitError(f"the adapter weights became NaN or infinite at step {step} ({bad}); nothing was written "
                          f"and the last checkpoint is untouched (lower train.learning_rate and {term('resume')})")
