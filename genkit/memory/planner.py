"""The plan: the fastest placement of a model that fits a budget, its predicted peak, and its report (genkit.memory).

The placements, from the fastest (`PLACEMENTS`): everything on the GPU, text encoders off it after encoding,
diffusers' model, group and sequential offload; then the VAE modes (`VAE_MODES`: whole, sliced, tiled) and a
smaller batch. `plan` prices each option from genkit.memory.sizes' counts and estimates (`Prices`) and keeps the
first that fits; `describe` and `Plan.to_json` are what `genkit info --model` prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from genkit.errors import GenkitError
from genkit.memory.sizes import (DTYPES, FORMATS, GiB, QUANTIZATIONS, Component, MetaModel, _quiet_diffusers, _tile,
                                 decode_activations, gib, meta_model, parse_bytes, step_activations, text_activations,
                                 weight_bytes)

if TYPE_CHECKING:
    from genkit.memory.runtime import Step


# -- Placements, from the fastest ------------------------------------------------------------------------------------

PLACEMENTS = {  # name -> (what it is, where each role's weights are)
    "gpu": ("everything on the GPU", {}),
    "text-encoders-offloaded": ("text encoders on the GPU to encode a run's prompts, then to the CPU before the "
                                "denoiser comes", {"text": "gpu to encode, then cpu"}),
    "model-offload": ("diffusers' enable_model_cpu_offload: each model on the GPU while it runs",
                      {"": "cpu; on the gpu while it runs"}),
    "group-offload": ("diffusers' enable_group_offload, block level, one block a group, with streams (the next "
                      "group is copied while one runs)", {"": "cpu; block groups on the gpu"}),
    "sequential-offload": ("diffusers' enable_sequential_cpu_offload: each layer on the GPU while it runs",
                           {"": "cpu; layer by layer on the gpu"}),
}
VAE_MODES = {"whole": "the batch decoded at once", "sliced": "one image at a time (enable_vae_slicing)",
             "tiled": "one image at a time, in tiles (enable_vae_slicing + enable_vae_tiling)"}
CUDA_ALLOWANCE = GiB  # not measured here: the CUDA context, cuBLAS/cuDNN workspaces, the caching allocator's slack


@dataclass(frozen=True)
class PlannedComponent:
    name: str
    cls: str
    parameters: int
    bytes: int  # its weights at `dtype` / `quantization`
    dtype: str
    quantization: str | None
    placement: str
    bytes_by_format: dict  # its weights at every dtype and quantization (FORMATS)


@dataclass(frozen=True)
class Plan:
    """The fastest placement that fits, and what it predicts (weights counted; activations estimated)."""

    model: str
    family: str
    device: str
    budget_bytes: int
    budget_from: str  # "given", or where the free memory was read
    width: int
    height: int
    asked_batch_size: int
    batch_size: int  # what the plan runs at a time (smaller than asked when nothing else fits)
    guidance_passes: int  # denoiser passes per image and step: 2 under classifier-free guidance
    components: list[PlannedComponent]
    placement: str
    vae: str  # VAE_MODES
    activations: dict  # bytes: text_encoding (the largest encoder), denoiser_step, vae_decode
    predicted_peak_bytes: int
    fits: bool

    def to_json(self) -> dict:
        """The plan as JSON: its fields, each component's class under "class"."""
        plan = asdict(self)
        plan["components"] = [{("class" if k == "cls" else k): v for k, v in c.items()} for c in plan["components"]]
        return plan


def plan(name_or_path: str | MetaModel | None = None, *, device: str | None = None, memory=None,
         width: int | None = None, height: int | None = None, batch_size: int = 1, dtype: str | None = None,
         quantize=None, allow_pickle: bool = False, step: "Step | None" = None) -> Plan:
    """The fastest placement of a model (a preset name, folder, hub id or `meta_model`) that fits `memory` (bytes or
    '12GiB'; default: what is free on `device` now), for `batch_size` images of `width` x `height` (default: the
    preset's or the family's size).

    `device` "cuda" plans for a GPU whether or not this machine has one (for a GPU not here, one that computes in
    bf16 natively); elsewhere everything stays in the one memory. `dtype`: the family's default on `device` unless
    given (genkit.loader.pick_dtype). `quantize`: plan weight-only quantized weights (`QUANTIZATIONS`): one name for
    the denoiser and text encoders, or {component: name}; genkit.quantize loads them (--quantize).
    `step`: price that placement, VAE mode and batch (`Step`) instead of choosing (what a step that ran out of memory
    was predicted to need)."""
    from genkit import loader
    from genkit.checks import check_count, check_multiple

    model = name_or_path if isinstance(name_or_path, MetaModel) else meta_model(name_or_path, allow_pickle=allow_pickle)
    family, pipe = model.family, model.pipe
    device = _device(device)
    cuda = device.startswith("cuda")
    here = cuda and _cuda_here(device)
    torch_dtype = loader.pick_dtype(dtype, device, family, bf16=None if here else True)
    dtype_name = loader.SHORT[str(torch_dtype).removeprefix("torch.")]
    check_count(batch_size, "batch_size")
    multiple = family.multiple(pipe)
    width = check_multiple("width", width or model.defaults.get("width") or family.default_size(pipe), multiple)
    height = check_multiple("height", height or model.defaults.get("height") or family.default_size(pipe), multiple)
    budget, budget_from = _budget(memory, device, here)
    quantization = _quantization(quantize, model)

    vae = next(iter(model.component("vae")), None)
    upcast = vae is not None and family.vae_upcast(_with_vae_dtype(pipe, torch_dtype))
    dtypes = {c.name: "fp32" if c.role == "vae" and upcast else dtype_name for c in model.components}
    prices = Prices(model, dtypes, quantization, width, height, cuda)

    placements = [p for p in PLACEMENTS if model.component("text") or p != "text-encoders-offloaded"] if cuda \
        else ["device"]
    options = [(batch, placement, vae_mode) for batch in _batches(batch_size) for placement in placements
               for vae_mode in _vae_modes(batch, vae, width, height)]  # the fastest first
    if step is not None:
        options = [(step.batch or batch_size, step.placement if cuda else "device", step.vae)]
    priced = [(*option, prices.peak(option[1], acts := prices.activations(option[0], option[2])), acts)
              for option in options]
    batch, placement, vae_mode, need, acts = next((p for p in priced if p[3] <= budget), priced[-1])

    def where(c: Component) -> str:
        if placement == "device":
            return device
        spots = PLACEMENTS[placement][1]
        return spots.get(c.role) or spots.get("", "gpu")

    components = [PlannedComponent(c.name, c.cls, c.parameters, prices.weights[c.name], dtypes[c.name],
                                   quantization.get(c.name), where(c),
                                   {f: weight_bytes(c.weights, f if f in DTYPES else dtypes[c.name],
                                                    None if f in DTYPES else f) for f in FORMATS})
                  for c in model.components]
    summary = {name: max((acts[c.name] for c in model.components if c.role == role), default=0)
               for name, role in (("text_encoding", "text"), ("denoiser_step", "denoiser"), ("vae_decode", "vae"))}
    return Plan(model.source, family.name, device, budget, budget_from, width, height, batch_size, batch,
                prices.passes, components, placement, vae_mode, summary, need, need <= budget)


class Prices:
    """What each option of a plan costs: activations by component, weights on the device, the peak."""

    def __init__(self, model: MetaModel, dtypes: dict, quantization: dict, width: int, height: int, cuda: bool):
        family, pipe = model.family, model.pipe
        self.model, self.dtypes, self.quantization, self.width, self.height = model, dtypes, quantization, width, height
        self.allowance = CUDA_ALLOWANCE if cuda else 0
        self.weights = {c.name: self.at(c, c.weights) for c in model.components}
        self.passes = 2 if family.negative_prompt else 1  # classifier-free guidance doubles the denoiser's batch
        self.text_tokens = family.max_sequence_length or 77  # CLIP's 77 where the family sets no longer cap
        side = family.latent_multiple(pipe)  # pixels a side of one latent position (UNet) or patch (transformer)
        self.positions = (width // side) * (height // side)

    def at(self, c: Component, weights) -> int:
        return weight_bytes(weights, self.dtypes[c.name], self.quantization.get(c.name))

    def activations(self, batch: int, vae_mode: str) -> dict:
        """Each component's activations while it runs, for `batch` images, the VAE decoding per `vae_mode`."""
        acts = {}
        for c in self.model.components:
            size = FORMATS[self.dtypes[c.name]].bits // 8
            if c.role == "text":
                limit = getattr(c.module.config, "max_position_embeddings", None) or self.text_tokens
                acts[c.name] = text_activations(c.module, min(self.text_tokens, limit), batch, size)
            elif c.role == "denoiser":
                acts[c.name] = step_activations(c.module, self.positions, self.text_tokens, self.passes * batch, size)
            elif c.role == "vae":
                images = batch if vae_mode == "whole" else 1
                tile = _tile(c.module) if vae_mode == "tiled" else None
                acts[c.name] = decode_activations(c.module, self.width, self.height, images, size, tile)
            else:
                acts[c.name] = 0
        return acts

    def resident(self, c: Component, placement: str) -> int:
        """Bytes of `c`'s weights on the device while it runs under `placement`."""
        if placement == "group-offload":  # what no group holds, the running group and the next (streams)
            return self.at(c, c.ungrouped) + sum(sorted((self.at(c, g) for g in c.groups), reverse=True)[:2])
        if placement == "sequential-offload":
            return max((self.at(c, layer) for layer in c.layers), default=0)
        return self.weights[c.name]

    def peak(self, placement: str, acts: dict) -> int:
        """The predicted peak of `placement`: the weights on the device at the worst moment, what runs then, the
        allowance."""
        texts = [c for c in self.model.components if c.role == "text"]
        rest = [c for c in self.model.components if c.role != "text"]

        def together(components) -> int:  # these on the device at once, the largest activations among them
            return sum(self.weights[c.name] for c in components) + max((acts[c.name] for c in components), default=0)

        if placement in ("gpu", "device"):
            need = together(self.model.components)
        elif placement == "text-encoders-offloaded":
            need = max(together(texts), together(rest))
        else:  # one model at a time, each with what its placement keeps of it
            need = max(self.resident(c, placement) + acts[c.name] for c in self.model.components)
        return need + self.allowance


def _device(device: str | None) -> str:
    """`device` as planned: cpu, mps, cuda or cuda:N, whether or not this machine has it; None: the best one here."""
    if device is None:
        from genkit.loader import pick_device

        return pick_device(None)
    kind = str(device).split(":")[0]
    index = str(device)[len(kind) + 1:]
    if kind not in ("cpu", "cuda", "mps") or (":" in str(device) and not index.isdigit()):
        raise GenkitError(f"{device}: plans are made for cpu, cuda, cuda:N or mps", param="device")
    return str(device)


def _cuda_here(device: str) -> bool:
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def _budget(memory, device: str, here: bool) -> tuple[int, str]:
    if memory is not None:
        return (memory if isinstance(memory, int) else parse_bytes(memory)), "given"
    if device.startswith("cuda") and not here or device.startswith("mps"):
        raise GenkitError(f"is needed: there is no {device} here to ask for its free memory (give the budget, like "
                          f"24GiB)", param="memory")
    from genkit.cpu import available_memory

    free = available_memory(device)
    if free is None:
        raise GenkitError(f"is needed: the free memory of {device} is not known here (give the budget, like 24GiB)",
                          param="memory")
    return free, f"free on {device} now"


def _quantization(quantize, model: MetaModel) -> dict:
    """{component: quantization} of `quantize` (one name: the denoiser and the text encoders)."""
    if not quantize:
        return {}
    if isinstance(quantize, str):
        quantize = {c.name: quantize for c in model.components if c.role in ("denoiser", "text")}
    names = {c.name for c in model.components}
    for name, scheme in quantize.items():
        if name not in names or scheme not in QUANTIZATIONS:
            raise GenkitError(f"{name}={scheme}: quantize one of {', '.join(sorted(names))} with one of "
                              f"{', '.join(QUANTIZATIONS)}", param="quantize")
    return dict(quantize)


def _with_vae_dtype(pipe, torch_dtype):
    """The meta pipeline with its VAE in `torch_dtype` (what family.vae_upcast reads)."""
    with _quiet_diffusers():  # its note on modules kept in fp32 is for loading weights; here none are
        pipe.vae.to(torch_dtype)
    return pipe


def _batches(batch: int) -> list[int]:
    """The asked batch, then halved (rounding up) down to 1."""
    sizes = [batch]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _vae_modes(batch: int, vae: Component | None, width: int, height: int) -> list[str]:
    """The VAE modes worth trying, cheapest first: slicing only helps a batch, tiling only an image past a tile."""
    if vae is None:
        return ["whole"]
    modes = ["whole"] + (["sliced"] if batch > 1 else [])
    tile = _tile(vae.module) if hasattr(vae.module, "enable_tiling") else None
    return modes + (["tiled"] if tile and max(width, height) > tile else [])


# -- Reading a plan --------------------------------------------------------------------------------------------------

def describe(plan: Plan) -> str:
    """The plan as `genkit info --model` prints it: each component with its bytes, dtype and placement, the
    activations, the placement and the predicted peak; then every component's bytes at each quantization."""
    passes = "two denoiser passes an image (classifier-free guidance)" if plan.guidance_passes == 2 else \
        "one denoiser pass an image (no classifier-free guidance)"
    batch = f"batch {plan.batch_size}" + (f" (asked {plan.asked_batch_size}: a smaller batch is what fits)"
                                          if plan.batch_size != plan.asked_batch_size else "")
    lines = [f"memory plan for {plan.model} ({plan.family}) on {plan.device}, from its configs alone "
             f"(weights counted, activations estimated)",
             f"budget       {gib(plan.budget_bytes)} ({plan.budget_from})",
             f"image        {plan.width}x{plan.height}, {batch}, {passes}", ""]
    rows = [("component", "class", "parameters", "bytes", "dtype", "placement")]
    for c in plan.components:
        dtype = c.dtype + (f", {c.quantization}" if c.quantization else "")
        count = f"{c.parameters / 1e9:.2f}B" if c.parameters >= 1e9 else f"{c.parameters / 1e6:.1f}M"
        rows.append((c.name, c.cls, count, gib(c.bytes), dtype, c.placement))
    lines += _table(rows) + [""]
    acts = plan.activations
    lines.append(f"activations  text encoding {gib(acts['text_encoding'])}, one denoiser step "
                 f"{gib(acts['denoiser_step'])}, VAE decode {gib(acts['vae_decode'])} (estimates)")
    placement = PLACEMENTS[plan.placement][0] if plan.placement in PLACEMENTS else f"everything on {plan.device}"
    lines.append(f"placement    {plan.placement}: {placement}; VAE {plan.vae}: {VAE_MODES[plan.vae]}")
    verdict = "fits" if plan.fits else "does not fit, even with the least memory genkit knows how to plan"
    lines.append(f"peak         {gib(plan.predicted_peak_bytes)} predicted of {gib(plan.budget_bytes)}: {verdict}")
    lines += ["", "weights at each dtype and weight-only quantization (Linear weight matrices quantized, the rest "
              "at the component's dtype; genkit does not quantize yet):"]
    rows = [("component", *FORMATS)] + [(c.name, *(gib(c.bytes_by_format[f]) for f in FORMATS))
                                         for c in plan.components]
    return "\n".join(lines + _table(rows))


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
