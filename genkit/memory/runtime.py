"""Runtime: putting a pipeline in a plan's step, and the step after running out of memory (genkit.memory).

A `Step` is what runs (placement, VAE mode, batch cap); `apply` puts a diffusers pipeline in one with diffusers'
offload calls (genkit.load, on CUDA), `next_step` is the one to retry a batch with after it ran out of memory (the
engine), and `ran_out` the one line (`OutOfMemory`) when that fails too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from genkit.errors import GenkitError
from genkit.memory.planner import PLACEMENTS, Plan, plan
from genkit.memory.sizes import MetaModel, _tile, gib, meta_model


@dataclass(frozen=True)
class Step:
    """What runs: a placement (`PLACEMENTS`, or "device": as loaded, no plan), a VAE mode (`VAE_MODES`), at most
    `batch` images a call (None: as asked), and what chose it ("plan", "flags", or "retry": after running out of
    memory)."""

    placement: str = "device"
    vae: str = "whole"
    batch: int | None = None
    by: str = "plan"

    def label(self) -> str:
        """What records and stderr say: "model-offload, VAE tiled", "none" (nothing applied)."""
        parts = [] if self.placement == "device" else [self.placement]
        parts += [f"VAE {self.vae}"] if self.vae != "whole" else []
        parts += [f"batch {self.batch}"] if self.batch else []
        text = ", ".join(parts) or "none"
        return text + {"flags": " (flags)", "retry": " (after running out of memory)"}.get(self.by, "")


def step_of(plan: Plan) -> Step:
    """The step a plan chose (its smaller batch, when it had to, as a cap)."""
    return Step(plan.placement, plan.vae, plan.batch_size if plan.batch_size < plan.asked_batch_size else None)


def apply(pipe, step: Step, device: str) -> None:
    """Put diffusers pipeline `pipe` in `step` on `device` (its onload device: "cuda", "cuda:1"; "cpu" runs the same
    calls where diffusers allows, for tests), undoing an earlier step's offload first:

    - gpu / device: `pipe.to(device)`;
    - text-encoders-offloaded: each text encoder kept on the CPU and moved to `device` when it encodes (accelerate's
      `cpu_offload_with_hook`, the hook diffusers' model offload uses), in a ring with the denoiser: an encoder
      starting moves the denoiser off, the denoiser starting moves the encoders off; the VAE stays on `device`;
    - model-offload: `pipe.enable_model_cpu_offload(device=device)`;
    - group-offload: `pipe.enable_group_offload(device, offload_type="block_level", num_blocks_per_group=1,
      use_stream=True)` (streams on CUDA only), diffusers' own hooks on its models, `apply_group_offloading` on the
      others (transformers' text encoders);
    - sequential-offload: `pipe.enable_sequential_cpu_offload(device=device)`;
    - VAE sliced: `vae.enable_slicing()`; tiled: slicing and `vae.enable_tiling()`.
    """
    import torch

    _undo_offload(pipe, device)
    if step.placement in ("gpu", "device"):
        pipe.to(device)
    elif step.placement == "text-encoders-offloaded":
        _offload_text_encoders(pipe, device)
    elif step.placement == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif step.placement == "group-offload":
        pipe.enable_group_offload(torch.device(device), offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=torch.device(device).type == "cuda")
    elif step.placement == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"no placement {step.placement!r}")
    vae = getattr(pipe, "vae", None)
    if vae is not None and step.vae in ("sliced", "tiled"):
        vae.enable_slicing()
    if vae is not None and step.vae == "tiled":
        vae.enable_tiling()


def _modules(pipe) -> dict:
    import torch

    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _undo_offload(pipe, device: str) -> None:
    """Remove accelerate's offload hooks and diffusers' group offloading, the weights back on the CPU (the next
    placement moves them from there)."""
    hooked = False
    for component in _modules(pipe).values():
        for module in component.modules():  # group offloading hooks the blocks, and the model itself only at times
            registry = getattr(module, "_diffusers_hook", None)
            for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
                if registry is not None and registry.get_hook(name) is not None:
                    registry.remove_hook(name, recurse=False)
                    hooked = True
        hooked = hooked or hasattr(component, "_hf_hook")
    if hooked:
        pipe.remove_all_hooks()
        pipe.to("cpu")


def _offload_text_encoders(pipe, device: str) -> None:
    from accelerate import cpu_offload_with_hook

    modules = _modules(pipe)
    encoders = [m for name, m in modules.items() if name.startswith("text_encoder")]
    for name, module in modules.items():
        if not name.startswith("text_encoder"):
            module.to(device)
    denoiser = next((m for name, m in modules.items() if name in ("unet", "transformer")), None)
    hooks = []
    for encoder in encoders:
        _, hook = cpu_offload_with_hook(encoder, device, prev_module_hook=hooks[-1] if hooks else None)
        hooks.append(hook)
    if denoiser is not None and hooks:
        _, ring = cpu_offload_with_hook(denoiser, device, prev_module_hook=hooks[-1])
        denoiser.to(device)  # on the device from the start; the next encoding moves it off
        hooks[0].hook.prev_module_hook = ring


def next_step(step: Step, where: str, batch: int, pipe, width: int, height: int, cuda: bool) -> Step | None:
    """The step to retry a batch of `batch` images with after it ran out of memory `where` ("decode": every denoising
    step had run; else "denoise"), in the planner's order: for a decode the next VAE mode (sliced for a batch, then
    tiled where the image is larger than a tile), then on CUDA the next placement (`PLACEMENTS`, from the current),
    then half the batch; None when nothing is left."""
    vae = getattr(pipe, "vae", None)
    if where == "decode" and vae is not None:
        modes = ["whole"] + (["sliced"] if batch > 1 else [])
        tile = _tile(vae) if hasattr(vae, "enable_tiling") else None
        modes += ["tiled"] if tile and max(width, height) > tile else []
        later = modes[modes.index(step.vae) + 1:] if step.vae in modes else []
        if later:
            return replace(step, vae=later[0], by="retry")
    if cuda:
        names = [p for p in PLACEMENTS if p != "text-encoders-offloaded" or
                 any(name.startswith("text_encoder") for name in _modules(pipe))]
        at = names.index(step.placement) if step.placement in names else 0
        if at + 1 < len(names):
            return replace(step, placement=names[at + 1], by="retry")
    if batch > 1:
        return replace(step, batch=(batch + 1) // 2, by="retry")
    return None


class RanOut(Exception):
    """A batch ran out of memory (torch.OutOfMemoryError) `where`: "decode" or "denoising" (text encoding included)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


class OutOfMemory(GenkitError):
    """A batch ran out of memory twice (its step, then the next): the CLI's one line and exit 2, the server's 507."""


def ran_out(pipeline, step: Step, jobs: list, meta: "MetaModel | None", budget=None) -> OutOfMemory:
    """The one line for a batch that ran out of memory with `step` too: what the planner estimates that step needs,
    and what would fit (a smaller batch, a quantization, a budget closer to what is really free)."""
    from genkit.errors import term

    first = jobs[0]
    what = f"{len(jobs)} image(s) of {first.width}x{first.height}"
    if meta is None and pipeline.kind == "diffusers":  # no plan was applied (a CPU): the estimate still helps
        try:
            meta = meta_model(pipeline.name)
        except GenkitError:
            pass
    if meta is None:
        return OutOfMemory(f"out of memory on {pipeline.device} making {what}, also with {step.label()} (this model "
                           f"has no memory plan: it is made from a diffusers pipeline's configs); pass a smaller "
                           f"{term('batch_size')} or size")
    from genkit.loader import SHORT

    dtype = SHORT[str(pipeline.dtype).removeprefix("torch.")]
    size = {"device": pipeline.device, "memory": budget, "width": first.width, "height": first.height,
            "dtype": dtype}
    need = plan(meta, batch_size=len(jobs), step=step, **size)
    fits = []
    if len(jobs) > 1 and (smaller := plan(meta, batch_size=1, **size)).fits:
        fits.append(f"{term('batch_size')} 1 (plan {smaller.placement}, {gib(smaller.predicted_peak_bytes)})")
    for scheme in ("int8", "nf4"):
        if (quantized := plan(meta, batch_size=len(jobs), quantize=scheme, **size)).fits:
            fits.append(f"--quantize {scheme} ({gib(quantized.predicted_peak_bytes)})")
            break
    fits.append(f"{term('memory')} with what is really free on this {pipeline.device} (this plan took "
                f"{gib(need.budget_bytes)}, {need.budget_from}), so it starts from more offload")
    return OutOfMemory(f"out of memory on {pipeline.device} making {what}, also with {step.label()}: the plan "
                       f"estimates {gib(need.predicted_peak_bytes)} for that step; what would fit: "
                       f"{'; '.join(fits)} (nothing of this batch was saved)")
