"""The LoRA trainer's adapters: added with peft (B starts at zero, so step 0 is the base model), their trained
parameters, the state dicts as diffusers' training scripts save them for each family, and the NaN check."""

from __future__ import annotations

import torch

from genkit.errors import GenkitError, term
from genkit.lora import diffusers_layout
from genkit.train.recipe import AdapterConfig


def add(pipe, family, cfg: AdapterConfig) -> list[tuple[str, torch.nn.Module]]:
    """Add peft LoRA layers (B starts at zero, so step 0 is the base model); returns the trained modules."""
    from peft import LoraConfig

    trained = [(family.denoiser_name, family.denoiser(pipe))]
    if cfg.text_encoder:
        trained.append(("text_encoder", pipe.text_encoder))
    for name, module in trained:
        targets = cfg.text_encoder_target_modules if name == "text_encoder" else cfg.target_modules
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                            target_modules=list(targets))
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
    families in diffusers' layout (feed-forward and convolution adapters renamed too, see genkit.lora._LAYOUTS),
    transformers in peft's."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layout(name, state):
        if family.lora_layout == "peft" and name == family.denoiser_name:
            return state
        return diffusers_layout(convert_state_dict_to_diffusers(state))

    return {name: layout(name, get_peft_model_state_dict(module)) for name, module in trained}


def check_finite(params: dict, step: int) -> None:
    bad = next((name for name, p in params.items() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise GenkitError(f"the adapter weights became NaN or infinite at step {step} ({bad}); nothing was written "
                          f"and the last checkpoint is untouched (lower train.learning_rate and {term('resume')})")
