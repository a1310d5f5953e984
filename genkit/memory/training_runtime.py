"""Putting a LoRA run in its training plan's steps (genkit.memory.training; applied by genkit.train.lora on CUDA).

- **Block swapping** (`swap_blocks`): the frozen weights and buffers of the last N of the denoiser's blocks live on
  the CPU; each call of such a block copies them to the device and runs the block through `torch.func.functional_call`
  on the copies. Its adapters stay on the device, so their gradients and optimizer states never move. Under gradient
  checkpointing (always on when blocks are swapped) the forward pass keeps no copy alive: the backward pass's
  recomputation copies the block again and frees it after the block's backward, so one swapped block is on the device
  at a time.
- **Placing the denoiser** (`place_denoiser`): on the device except the swapped blocks' frozen weights.
- **The encoders in turn** (`encoders_in_turn`): each text encoder on the device only while it runs (accelerate's
  `cpu_offload_with_hook` in a chain, as diffusers' model offload), for the caption cache and the validation prompts.
- **Caching** (`Caching`): where the text encoders and the VAE are while the caches fill, and afterwards.
- **Sampling** (`sampling`): a validation grid with the encoders offloaded: the denoiser off the device while the
  prompts are encoded, back (its swapped blocks still on the CPU) when it runs, the VAE on the device meanwhile.
- **The optimizer** (`optimizer`): torch's AdamW, or bitsandbytes' AdamW8bit.
"""

from __future__ import annotations

import contextlib

import torch

from genkit.memory.training_sizes import blocks


def _to(device):
    return lambda t: t.to(device)


def _trained(module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _offloaded(block):
    """(name, tensor) of a swapped block's frozen parameters and buffers: what each call copies to the device."""
    params = [(n, p) for n, p in block.named_parameters() if not p.requires_grad]
    return params + list(block.named_buffers())


def swap_blocks(denoiser, count: int, device) -> list:
    """Keep the last `count` of `denoiser`'s blocks (`genkit.memory.training.blocks`) on the CPU, copied to `device`
    each time one runs; returns them. Their adapters stay on `device`."""
    swapped = blocks(denoiser)[len(blocks(denoiser)) - count:] if count else []
    for block in swapped:
        block.to("cpu")
        for module in block.modules():
            if _trained(module):
                module._apply(_to(device), recurse=False)
        _wrap(block, device)
    denoiser._genkit_swapped = swapped
    return swapped


def _wrap(block, device) -> None:
    """Replace `block.forward` by a call on device copies of its frozen weights (functional_call); inside that call
    the block's own forward runs."""
    original, state = block.forward, {"inside": False}

    def forward(*args, **kwargs):
        if state["inside"]:
            return original(*args, **kwargs)
        weights = {name: t.to(device, non_blocking=True) for name, t in _offloaded(block)}
        state["inside"] = True
        try:
            return torch.func.functional_call(block, weights, args, kwargs, strict=False)
        finally:
            state["inside"] = False

    block._genkit_forward = original
    block.forward = forward


def unswap(denoiser) -> None:
    """Undo `swap_blocks`: the blocks' own forward back, their weights where `place_denoiser` or `.to` puts them."""
    for block in getattr(denoiser, "_genkit_swapped", []):
        block.forward = block._genkit_forward
        del block._genkit_forward
    denoiser._genkit_swapped = []


def place_denoiser(denoiser, device) -> None:
    """`denoiser` on `device`, but for its swapped blocks' frozen weights and buffers (on the CPU)."""
    swapped = {id(b) for b in getattr(denoiser, "_genkit_swapped", [])}

    def visit(module):
        if id(module) in swapped:
            module.to("cpu")
            for inner in module.modules():
                if _trained(inner):
                    inner._apply(_to(device), recurse=False)
            return
        module._apply(_to(device), recurse=False)
        for child in module.children():
            visit(child)

    visit(denoiser)


@contextlib.contextmanager
def encoders_in_turn(encoders: list, device):
    """Each of `encoders` on `device` only while it runs, in a chain (one starting moves the one before off); all
    on the CPU afterwards."""
    from accelerate import cpu_offload_with_hook

    hooks = []
    for encoder in encoders:
        _, hook = cpu_offload_with_hook(encoder, device, prev_module_hook=hooks[-1] if hooks else None)
        hooks.append(hook)
    try:
        yield hooks
    finally:
        for hook in hooks:
            hook.offload()
            hook.remove()


class Caching:
    """Where the encoders are while the caches fill and afterwards, on `device`: with `offloaded`, the text encoders
    in turn for the captions, the VAE alone for the images, all of them on the CPU afterwards (but a VAE that
    `keep_vae` keeps, encoding every batch); else every encoder on the device from the start. The `staying` text
    encoders (a trained one; all of them when captions are encoded every step) are on the device throughout.
    `active` False (a CPU): nothing moves."""

    def __init__(self, pipe, encoders: list, device, *, offloaded: bool, staying=(), keep_vae: bool = False,
                 active: bool = True):
        self.vae, self.device, self.offloaded, self.keep_vae = getattr(pipe, "vae", None), device, offloaded, keep_vae
        self.encoders, self.active = [e for e in encoders if not any(e is s for s in staying)], active
        if not active:
            return
        unhook(pipe)
        for module in [*staying, *([] if offloaded else [*self.encoders, self.vae])]:
            if module is not None:
                module.to(device)

    def texts(self):
        """While the captions are encoded."""
        if self.active and self.offloaded:
            return encoders_in_turn(self.encoders, self.device)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def images(self):
        """While the images are encoded."""
        if self.active and self.offloaded and self.vae is not None:
            self.vae.to(self.device)
        yield
        if self.active and self.offloaded and self.vae is not None and not self.keep_vae:
            self.vae.to("cpu")
            torch.cuda.empty_cache()


def unhook(pipe) -> None:
    """genkit.load's placement undone (its offload hooks removed), every model on the CPU."""
    from genkit.memory.runtime import _undo_offload

    _undo_offload(pipe, "cpu")
    pipe.to("cpu")


@contextlib.contextmanager
def sampling(pipe, denoiser, encoders: list, device, vae_stays: bool):
    """A validation grid with the encoders offloaded: the VAE on `device`, each of `encoders` (the untrained text
    encoders) on it in turn while the prompts are encoded, the denoiser moved off meanwhile and back (in its swapped
    placement) when it runs; afterwards the encoders and, unless `vae_stays`, the VAE on the CPU again."""
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.to(device)
    handles = []
    with encoders_in_turn(encoders, device) as hooks:
        if hooks:
            def off(*_):
                denoiser.to("cpu")

            def on(*_):
                hooks[-1].offload()
                place_denoiser(denoiser, device)

            handles = [encoders[0].register_forward_pre_hook(off), denoiser.register_forward_pre_hook(on)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
    place_denoiser(denoiser, device)
    if vae is not None and not vae_stays:
        vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def optimizer(params, *, lr: float, weight_decay: float, eight_bit: bool):
    """torch's AdamW, or bitsandbytes' AdamW8bit (the same update, its two moments kept in 8 bits)."""
    if eight_bit:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
