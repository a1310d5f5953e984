"""The training memory plan: what a LoRA run needs on a device, and the cheapest steps that make it fit (genkit.memory).

A LoRA run holds more than generation does: the frozen base, the adapters in fp32 with their gradients and AdamW's
two moments, and every activation the backward pass needs. It also runs in phases, each with its own peak:

- **caching**: the text encoders and the VAE fill the caption and latent caches, `ENCODE_CHUNK` captions or images a
  call, without gradients, before the denoiser comes to the device (genkit.train.lora places it afterwards);
- **training**: the denoiser (its weights as loaded, the adapters, their gradients, the optimizer's states), the
  caches, and the step's activations, with the text encoders and VAE still there unless moved off;
- **validation**: sample grids during the run, without gradients: the optimizer's states and the caches stay; with
  the encoders offloaded each text encoder comes back alone for the prompts, then the denoiser and the VAE.

From the cheapest, the steps (`STEPS`) added one after another until the largest phase fits the budget:
gradient checkpointing (diffusers' `enable_gradient_checkpointing`), the text encoders and VAE off the device once
the caches are made (one model on it at a time while they are made), bitsandbytes' 8-bit AdamW (CUDA, with
bitsandbytes installed), the frozen base's Linear weights int8 (torchao) or nf4 (bitsandbytes, CUDA), the text
encoders' int8, then a number of the denoiser's blocks kept on the CPU and copied in as each runs (block swapping,
transformers only; genkit.memory.training_runtime). `plan_training` says in one line what it chose and why, or why
nothing fits and the smallest budget that would; `describe` and `TrainingPlan.to_json` are what
`genkit train lora --dry-run` prints.

What is counted and what is estimated: weights, adapter parameters (peft's matching of `target_modules` on the meta
modules), gradients and optimizer states are counted; activations are estimates (`training_activations`), the widths
of one token (or latent pixel) that the backward pass keeps, read off the tensors saved for it in the tiny models
of every family on the CPU (tests/test_train_memory.py checks each within its tolerance). The model, its counts and
the estimates live in genkit.memory.training_sizes; this module prices the options and chooses.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

from genkit.errors import GenkitError
from genkit.memory.planner import CUDA_ALLOWANCE, PlannedComponent, _budget, _device, _table
from genkit.memory.sizes import (DTYPES, FORMATS, Component, decode_activations, gib, step_activations,
                                 text_activations, weight_bytes)
from genkit.memory.training_sizes import (  # noqa: F401  (the training plan's names, from one module)
    ACTIVATION_BYTES, BACKWARD_WIDTHS, TOKEN_WIDTHS, UNET_ATTENTION_WIDTHS, UNET_RESNET_WIDTHS, TrainingModel, blocks,
    encode_activations, from_configs, lora_layers, lora_parameters, matches, text_training_activations,
    training_activations, training_model, weights_of)

STEPS = {  # the ladder, cheapest first: name -> what it does
    "checkpointing": "gradient checkpointing: the denoiser keeps each block's input and recomputes the rest in the "
                     "backward pass (about a third more compute)",
    "encoders-offloaded": "text encoders and VAE on the device to fill the caches (and for validation samples), on "
                          "the CPU while training",
    "adamw-8bit": "bitsandbytes' 8-bit AdamW: the two moments in 8 bits, 2 bytes a trained parameter instead of 8",
    "int8": "the frozen base's Linear weights int8, weight-only (torchao), as QLoRA keeps its base quantized",
    "nf4": "the frozen base's Linear weights nf4 (bitsandbytes), QLoRA's 4-bit base",
    "text-encoders-int8": "the text encoders' Linear weights int8 (torchao) while they fill the caches and sample: "
                          "the cached embeddings carry int8's rounding",
    "block-swap": "some of the denoiser's blocks kept on the CPU, each copied to the device when it runs (forward "
                  "and recomputation)",
}
QUANTIZATIONS = ("int8", "nf4")  # the base's, cheapest first (int8: peft's torchao LoRA layers take int8 only)
ADAMW_STATE = 8  # bytes a trained parameter: AdamW's two fp32 moments
ADAMW_8BIT_STATE = 2  # bitsandbytes' AdamW8bit: two 8-bit moments (its block-wise scales add under 1%)
ENCODE_CHUNK = 8  # captions or images a caching call (genkit.train.encoders.ENCODE_CHUNK; a test keeps them equal)




@dataclass(frozen=True)
class LoraRun:
    """What a LoRA run trains, as the plan needs it (genkit.train.lora builds it from the recipe)."""

    resolution: int = 0  # square training side in pixels; 0: the family's own
    batch_size: int = 1  # images a forward pass
    rank: int = 16  # LoRA rank
    target_modules: tuple = ("to_q", "to_k", "to_v", "to_out.0")  # the denoiser's adapted layers (peft's matching)
    text_encoder: bool = False  # the first text encoder trained too (it stays on the device, no caption cache)
    text_encoder_target_modules: tuple = ("q_proj", "k_proj", "v_proj", "out_proj")
    checkpointing: bool = False  # asked for by the recipe: on whatever the plan says
    cache_latents: bool = True  # images encoded once; False: the VAE encodes every batch (it stays on the device)
    validation_prompts: int = 0  # prompts of the validation grids during the run; 0: none
    images: int = 0  # image variants in the latent cache (on the device)
    captions: int = 0  # distinct captions in the caption cache (on the device)
    text_tokens: int | None = None  # tokens of a caption as the denoiser reads them; None: the family's cap
    captions_every_step: bool = False  # captions encoded every step (shuffled tags): the encoders stay, no cache


@dataclass(frozen=True)
class TrainingPlan:
    """The cheapest steps that fit, and what each phase of the run is predicted to need."""

    model: str
    family: str
    device: str
    budget_bytes: int
    budget_from: str  # "given", or where the free memory was read
    dtype: str  # the frozen base's and the activations' dtype (the run's mixed precision)
    resolution: int
    batch_size: int
    rank: int
    lora_parameters: int  # trained parameters (fp32)
    steps: list  # the chosen STEPS, in order
    checkpointing: bool
    optimizer: str  # "adamw" or "adamw-8bit"
    quantization: str | None  # the denoiser's Linear weights: "int8", "nf4" or None (its dtype)
    blocks_swapped: int  # denoiser blocks kept on the CPU
    blocks: int  # denoiser blocks block swapping could take
    components: list  # PlannedComponent each
    placement: str  # "device" (a CPU), "gpu", "encoders-offloaded" or "block-swap"
    phases: dict  # bytes at each phase's peak: caching, training, validation (0: no validation)
    training: dict  # the training phase's bytes: weights, lora, gradients, optimizer, caches, activations, allowance
    predicted_peak_bytes: int
    fits: bool
    reason: str  # one line: what was chosen and why, or why nothing fits
    smallest_budget_bytes: int  # the least memory any steps genkit could take need (the refusal names it)
    unavailable: dict = field(default_factory=dict)  # step -> why it could not be taken here

    def to_json(self) -> dict:
        """The plan as JSON: its fields, each component's class under "class" (the keys `genkit info --json` uses)."""
        plan = asdict(self)
        plan["components"] = [{("class" if k == "cls" else k): v for k, v in c.items()} for c in plan["components"]]
        return plan

    def refusal(self) -> str:
        """The refusal, as what follows the budget's name: "8.0 GiB (given) is too small for this run: ..."."""
        why = self.reason.partition(": ")[2]
        return f"{gib(self.budget_bytes)} ({self.budget_from}) is too small for this run: {why}"

    def label(self) -> str:
        """The chosen steps in a few words: "checkpointing, int8, 12 of 57 blocks on the cpu", "none"."""
        words = [f"{self.blocks_swapped} of {self.blocks} blocks on the cpu" if s == "block-swap" else s
                 for s in self.steps]
        return ", ".join(words) or "none"


# -- Pricing -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One rung of the ladder: the steps taken (and how many blocks are swapped)."""

    steps: tuple = ()
    swapped: int = 0

    @property
    def quantization(self) -> str | None:
        return next((s for s in self.steps if s in QUANTIZATIONS), None)


class Costs:
    """What each option of a training plan costs, phase by phase."""

    def __init__(self, model: TrainingModel, run: LoraRun, dtype: str, resolution: int, cuda: bool):
        self.model, self.run, self.dtype, self.resolution = model, run, dtype, resolution
        self.size = FORMATS[dtype].bits // 8
        self.cuda = cuda
        self.acts = ACTIVATION_BYTES[dtype]
        self.allowance = CUDA_ALLOWANCE if cuda else 0
        self.denoiser = model.denoiser
        self.texts, self.vae = model.role("text"), next(iter(model.role("vae")), None)
        self.positions = (resolution // model.latent_side) ** 2
        self.text_tokens = run.text_tokens or model.text_tokens
        module = self.denoiser.module
        self.lora = lora_parameters(module, run.target_modules, run.rank)
        self.trained_text = self.texts[0] if run.text_encoder and self.texts else None
        if self.trained_text is not None:
            self.lora += lora_parameters(self.trained_text.module, run.text_encoder_target_modules, run.rank)
        # text encoders on the device throughout: the trained one, or all while captions are encoded every step
        self.staying = self.texts if run.captions_every_step else [c for c in [self.trained_text] if c is not None]
        self.blocks = [weights_of(block) for block in blocks(module)]

    def weights(self, c: Component, option: Option) -> int:
        """`c`'s weights as `option` loads them: the denoiser's Linear weights at its quantization, the text
        encoders' at int8 with text-encoders-int8 (a trained one never), the rest at the dtype."""
        scheme = option.quantization if c is self.denoiser else \
            "int8" if c.role == "text" and "text-encoders-int8" in option.steps and c is not self.trained_text else None
        return weight_bytes(c.weights, self.dtype, scheme)

    def denoiser_resident(self, option: Option) -> int:
        """The denoiser's weights on the device: all but the swapped blocks, and the one being run."""
        total = self.weights(self.denoiser, option)
        if not option.swapped:
            return total
        swapped = [weight_bytes(b, self.dtype, option.quantization) for b in self.blocks[-option.swapped:]]
        return total - sum(swapped) + max(swapped)

    def caches(self) -> int:
        """The latent cache (mean and std a variant, fp32) and the caption cache on the device."""
        run, latent = self.run, 0
        if self.vae is not None and run.cache_latents:
            channels = getattr(self.vae.module.config, "latent_channels", None) or \
                getattr(self.vae.module.config, "z_dim", 4)
            side = self.resolution // self.model.vae_factor
            latent = run.images * 2 * channels * side * side * 4
        width = sum(getattr(_text(c).config, "hidden_size", None) or getattr(_text(c).config, "d_model", 0)
                    for c in self.texts)
        captions = 0 if self.staying else run.captions * self.text_tokens * width * self.size
        return latent + captions

    def caching(self, option: Option) -> int:
        """Filling the caches. With the encoders offloaded, one model on the device at a time: each text encoder
        for the captions (accelerate's offload hooks, in a chain), then the VAE for the images; else all of them
        together, the largest encoding call."""
        texts = [] if self.staying else self.texts  # encoders that run every step make no cache
        captions = min(ENCODE_CHUNK, self.run.captions or ENCODE_CHUNK)
        images = min(ENCODE_CHUNK, self.run.images or ENCODE_CHUNK)
        calls = [(self.weights(c, option), text_activations(_text(c), self._tokens(c), captions, self.size))
                 for c in texts]
        if self.vae is not None and self.run.cache_latents:
            encode = encode_activations(self.vae.module, self.resolution, self.resolution, images, self.size)
            calls.append((self.weights(self.vae, option), encode))
        if not calls:
            return 0
        if "encoders-offloaded" in option.steps:
            kept = sum(self.weights(c, option) for c in self.staying)
            return kept + max(w + a for w, a in calls) + self.allowance
        return self.encoders(option) + max(a for _, a in calls) + self.allowance

    def encoders(self, option: Option) -> int:
        """The text encoders' and the VAE's weights together."""
        return sum(self.weights(c, option) for c in [*self.texts, *([self.vae] if self.vae else [])])

    def _tokens(self, c: Component) -> int:
        limit = getattr(_text(c).config, "max_position_embeddings", None) or self.text_tokens
        return min(self.text_tokens, limit)

    def training(self, option: Option) -> dict:
        """The training step's bytes by part."""
        run, offloaded = self.run, "encoders-offloaded" in option.steps
        checkpointing = run.checkpointing or "checkpointing" in option.steps
        weights = self.denoiser_resident(option)
        if not offloaded:
            weights += self.encoders(option)
        else:
            weights += sum(self.weights(c, option) for c in self.staying)
            if self.vae is not None and not run.cache_latents:
                weights += self.weights(self.vae, option)
        acts = training_activations(self.denoiser.module, self.positions, self.text_tokens, run.batch_size,
                                    self.acts, checkpointing=checkpointing, rank=run.rank,
                                    targets=run.target_modules, masked=self.model.attention_masked)
        if self.trained_text is not None:
            acts += text_training_activations(_text(self.trained_text), self._tokens(self.trained_text),
                                              run.batch_size, self.acts)
        elif run.captions_every_step:  # the batch's captions encoded before its forward pass, without gradients
            acts = max([acts] + [text_activations(_text(c), self._tokens(c), run.batch_size, self.size)
                                 for c in self.texts])
        if self.vae is not None and not run.cache_latents:  # each batch encoded before its forward pass
            acts = max(acts, encode_activations(self.vae.module, self.resolution, self.resolution, run.batch_size,
                                                self.acts))
        state = ADAMW_8BIT_STATE if "adamw-8bit" in option.steps else ADAMW_STATE
        return {"weights": weights, "lora": 4 * self.lora, "gradients": 4 * self.lora, "optimizer": state * self.lora,
                "caches": self.caches(), "activations": acts, "allowance": self.allowance}

    def validation(self, option: Option, training: dict) -> int:
        """Sampling a validation grid, without gradients. With the encoders offloaded, in turns: each text encoder
        alone on the device for the prompts (the denoiser's resident part and its adapters moved off meanwhile), then
        the denoiser and the VAE (decoding one image at a time); else every model on the device. The optimizer's
        states and the caches stay throughout."""
        if not self.run.validation_prompts:
            return 0
        prompts = 1 if self.cuda else self.run.validation_prompts  # on CUDA one image a call (genkit.train.lora)
        kept = training["optimizer"] + training["caches"] + self.allowance
        denoiser = self.denoiser_resident(option) + training["lora"]
        vae = self.weights(self.vae, option) if self.vae is not None else 0
        texts = {c.name: (self.weights(c, option), text_activations(_text(c), self._tokens(c), prompts, self.size))
                 for c in self.texts}
        step = step_activations(self.denoiser.module, self.positions, self.text_tokens,
                                self.model.guidance_passes * prompts, self.size)
        if self.vae is not None:
            step = max(step, decode_activations(self.vae.module, self.resolution, self.resolution, 1, self.size))
        if "encoders-offloaded" not in option.steps:
            return kept + denoiser + vae + sum(w for w, _ in texts.values()) + \
                max([step] + [a for _, a in texts.values()])
        for c in self.staying:  # on the device throughout
            w, a = texts.pop(c.name)
            kept, step = kept + w, max(step, a)
        return kept + vae + max([denoiser + step] + [w + a for w, a in texts.values()])  # the VAE stays throughout

    def price(self, option: Option) -> tuple[dict, dict]:
        training = self.training(option)
        phases = {"caching": self.caching(option), "training": sum(training.values()),
                  "validation": self.validation(option, training)}
        return phases, training


def _text(c: Component):
    """A text encoder as the text formulas read it: its language model's config (a vision-language model's
    text_config, as Qwen-Image's Qwen2.5-VL keeps it)."""
    config = c.module.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return c.module if text is config else SimpleNamespace(config=text)


# -- The plan ----------------------------------------------------------------------------------------------------

def plan_training(model, run: LoraRun | None = None, *, device: str | None = None, memory=None,
                  dtype: str | None = None, available: set | None = None) -> TrainingPlan:
    """The cheapest steps that make LoRA run `run` of `model` (a preset name, folder or hub id, planned from its
    configs alone; a `MetaModel`; a loaded `genkit.Pipeline`; a `TrainingModel`) fit `memory` (bytes or '24GiB';
    default: what is free on `device` now).

    `device` "cuda" plans for a GPU whether or not this machine has one; "cpu" plans the process's memory (only the
    steps that apply there: checkpointing and an int8 base). `dtype`: the frozen base's and the activations' (the
    run's mixed precision): bf16 on CUDA, fp32 on a CPU unless given. `available`: the optional packages the steps
    may use ({"bitsandbytes", "torchao"}; default: those installed here)."""
    run = run or LoraRun()
    tm = training_model(model)
    device = _device(device)
    cuda = device.startswith("cuda")
    here = cuda and _cuda_here(device)
    budget, budget_from = _budget(memory, device, here)
    dtype = dtype or ("bf16" if cuda else "fp32")
    if dtype not in DTYPES:
        raise GenkitError(f"{dtype!r}: plan training in one of {', '.join(DTYPES)}", param="dtype")
    resolution = run.resolution or tm.default_resolution
    if resolution % tm.multiple:
        raise GenkitError(f"must be a multiple of {tm.multiple} for {tm.source}, got {resolution}",
                          param="data.resolution")
    if run.text_encoder and not tm.text_encoder_lora:
        raise GenkitError(f"lora.text_encoder: {tm.family} trains no text-encoder adapters; set "
                          f"lora.text_encoder=false")
    costs = Costs(tm, replace(run, resolution=resolution), dtype, resolution, cuda)
    available = _installed() if available is None else set(available)
    allowed, unavailable = _allowed(cuda, available, bool(costs.blocks), run, tm)
    ladder = _ladder(allowed, len(costs.blocks))
    priced = [(option, *costs.price(option)) for option in ladder]
    chosen = next((p for p in priced if max(p[1].values()) <= budget), None)
    last = priced[-1]
    option, phases, training = chosen or last
    need = max(phases.values())
    everything = _ladder(_allowed(cuda, {"bitsandbytes", "torchao"}, bool(costs.blocks), run, tm)[0],
                         len(costs.blocks))
    smallest = min(max(costs.price(o)[0].values()) for o in everything)
    reason = _reason(chosen, priced, budget, last, smallest, unavailable, costs)
    checkpointing = run.checkpointing or "checkpointing" in option.steps
    steps = list(option.steps)
    if run.checkpointing and "checkpointing" not in steps:
        steps.insert(0, "checkpointing")
    return TrainingPlan(
        tm.source, tm.family, device, budget, budget_from, dtype, resolution, run.batch_size, run.rank, costs.lora,
        steps, checkpointing, "adamw-8bit" if "adamw-8bit" in option.steps else "adamw", option.quantization,
        option.swapped, len(costs.blocks), _components(tm, costs, option, cuda, device), _placement(option, cuda),
        phases, training, need, need <= budget, reason, smallest, unavailable)


def _installed() -> set:
    return {name for name in ("bitsandbytes", "torchao") if importlib.util.find_spec(name) is not None}


def _cuda_here(device: str) -> bool:
    from genkit.memory.planner import _cuda_here as here

    return here(device)


def _allowed(cuda: bool, available: set, swappable: bool, run: LoraRun, tm: TrainingModel) -> tuple[list, dict]:
    """The steps this plan may take, in the ladder's order, and why each other one cannot be taken."""
    why = {}
    if not cuda:
        why.update({s: "CUDA only (one memory on a CPU)" for s in ("encoders-offloaded", "block-swap")})
        why.update({s: "bitsandbytes runs on CUDA" for s in ("adamw-8bit", "nf4")})
    else:
        if "bitsandbytes" not in available:
            why.update({s: "needs bitsandbytes (pip install bitsandbytes)" for s in ("adamw-8bit", "nf4")})
        if not swappable:
            why["block-swap"] = "for transformers (a UNet's blocks are few and uneven)"
    if "torchao" not in available:
        why["int8"] = why["text-encoders-int8"] = "needs torchao (pip install \"genkit[quant]\")"
    if not tm.quantizable:
        why.update({s: f"genkit does not quantize {tm.family}'s own format" for s in (*QUANTIZATIONS,
                                                                                    "text-encoders-int8")})
    elif run.text_encoder:
        why["text-encoders-int8"] = "the trained text encoder stays unquantized (lora.text_encoder)"
    return [s for s in STEPS if s not in why], why


def _ladder(allowed: list, blocks: int) -> list[Option]:
    """Every option, cheapest first: no step, then each step added in STEPS's order (a quantization replacing the
    last), then 1, 2, ... blocks swapped (all but one at most)."""
    options, taken = [Option()], ()
    for step in ("checkpointing", "encoders-offloaded", "adamw-8bit"):
        if step in allowed:
            taken += (step,)
            options.append(Option(taken))
    quantized = taken
    for scheme in QUANTIZATIONS:
        if scheme in allowed:
            quantized = taken + (scheme,)
            options.append(Option(quantized))
    if "text-encoders-int8" in allowed:
        quantized += ("text-encoders-int8",)
        options.append(Option(quantized))
    if "block-swap" in allowed:
        options += [Option(quantized + ("block-swap",), n) for n in range(1, blocks)]
    return options


def _placement(option: Option, cuda: bool) -> str:
    if not cuda:
        return "device"
    if option.swapped:
        return "block-swap"
    return "encoders-offloaded" if "encoders-offloaded" in option.steps else "gpu"


def _components(tm: TrainingModel, costs: Costs, option: Option, cuda: bool, device: str) -> list:
    offloaded = "encoders-offloaded" in option.steps

    def where(c: Component) -> str:
        if not cuda:
            return device
        if c.role == "denoiser":
            return f"gpu; {option.swapped} of {len(costs.blocks)} blocks on the cpu" if option.swapped else "gpu"
        if c.role in ("text", "vae") and offloaded and c not in costs.staying and \
                not (c.role == "vae" and not costs.run.cache_latents):
            return "gpu to fill the caches, then cpu"
        return "gpu"

    def scheme(c: Component) -> str | None:
        if c.role == "text" and "text-encoders-int8" in option.steps and c is not costs.trained_text:
            return "int8"
        return option.quantization if c.role == "denoiser" else None

    return [PlannedComponent(c.name, c.cls, c.parameters, costs.weights(c, option), costs.dtype, scheme(c), where(c),
                             {f: weight_bytes(c.weights, f if f in DTYPES else costs.dtype, None if f in DTYPES else f)
                              for f in FORMATS})
            for c in tm.components]


def _reason(chosen, priced, budget: int, last, smallest: int, unavailable: dict, costs: Costs) -> str:
    """One line: what was chosen and why, or why nothing fits and the least memory that would."""
    if chosen is not None:
        option, phases, _ = chosen
        peak = max(phases, key=phases.get)
        if not option.steps:
            return f"nothing needed: {gib(phases[peak])} predicted of {gib(budget)} (peak: {peak})"
        kind = option.steps[-1]
        at = [p[0] for p in priced].index(option)
        before = priced[at - 1] if kind in QUANTIZATIONS else \
            next(p for p in reversed(priced[:at]) if p[0].steps == option.steps[:-1])
        what = "block swapping" if kind == "block-swap" else kind
        return (f"{', '.join(_words(option, len(costs.blocks)))}: {gib(max(phases.values()))} predicted of "
                f"{gib(budget)} (peak: {peak}); without {what} {gib(max(before[1].values()))}, over the budget")
    option, phases, _ = last
    peak = max(phases, key=phases.get)
    line = (f"nothing fits {gib(budget)}: with {', '.join(_words(option, len(costs.blocks))) or 'no step'} the "
            f"{peak} phase needs {gib(phases[peak])} ({_largest(peak, phases, costs, option)}); the smallest budget "
            f"that would fit is {gib(smallest)}")
    missing = sorted({why for step, why in unavailable.items() if why.startswith("needs")})
    if missing and smallest < max(phases.values()):
        line += f" ({'; '.join(missing)})"
    return line


def _words(option: Option, blocks: int) -> list[str]:
    return [f"{option.swapped} of {blocks} blocks on the cpu" if s == "block-swap" else s for s in option.steps]


def _largest(phase: str, phases: dict, costs: Costs, option: Option) -> str:
    """What dominates a phase, for the refusal."""
    if phase == "caching":
        c = max([*costs.texts, *([costs.vae] if costs.vae else [])], key=lambda c: costs.weights(c, option))
        return f"{c.name} alone {gib(costs.weights(c, option))}"
    if phase == "validation":
        return "every model back on the device for the samples (validation.every=0 turns them off)"
    training = costs.training(option)
    part = max(training, key=training.get)
    return f"{part} {gib(training[part])}"


# -- Reading a plan ----------------------------------------------------------------------------------------------

def describe(plan: TrainingPlan) -> str:
    """The plan as `genkit train lora --dry-run` prints it: each component with its bytes, dtype and placement, the
    trained parameters, each phase's peak, the training step's parts, the steps chosen and why."""
    lines = [f"training memory plan for {plan.model} ({plan.family}) on {plan.device} (weights counted, activations "
             f"estimated)",
             f"budget       {gib(plan.budget_bytes)} ({plan.budget_from})",
             f"run          {plan.resolution}x{plan.resolution}, batch {plan.batch_size}, LoRA rank {plan.rank}: "
             f"{plan.lora_parameters / 1e6:.1f}M trained parameters (fp32), {plan.dtype} base", ""]
    rows = [("component", "class", "parameters", "bytes", "dtype", "placement")]
    for c in plan.components:
        dtype = c.dtype + (f", {c.quantization}" if c.quantization else "")
        number = f"{c.parameters / 1e9:.2f}B" if c.parameters >= 1e9 else f"{c.parameters / 1e6:.1f}M"
        rows.append((c.name, c.cls, number, gib(c.bytes), dtype, c.placement))
    lines += _table(rows) + [""]
    t = plan.training
    lines.append(f"training     weights {gib(t['weights'])}, adapters {gib(t['lora'])} + gradients "
                 f"{gib(t['gradients'])} + {plan.optimizer} {gib(t['optimizer'])}, caches {gib(t['caches'])}, "
                 f"activations {gib(t['activations'])} (estimate{', checkpointed' if plan.checkpointing else ''})")
    phases = ", ".join(f"{name} {gib(n)}" for name, n in plan.phases.items() if n)
    lines.append(f"phases       {phases}")
    lines.append(f"steps        {plan.label()}")
    verdict = "fits" if plan.fits else "does not fit"
    lines.append(f"peak         {gib(plan.predicted_peak_bytes)} predicted of {gib(plan.budget_bytes)}: {verdict}")
    lines.append(f"why          {plan.reason}")
    if plan.unavailable:
        lines.append("not here     " + "; ".join(f"{s}: {why}" for s, why in plan.unavailable.items()))
    return "\n".join(lines)


def summary(plan: TrainingPlan) -> str:
    """The one stderr line a training run starts with."""
    verdict = "fits" if plan.fits else "does not fit"
    return (f"memory plan: {plan.label()}, {gib(plan.predicted_peak_bytes)} predicted of {gib(plan.budget_bytes)} "
            f"({plan.budget_from}): {verdict}; {plan.reason}")


def record(plan: TrainingPlan) -> dict:
    """What the LoRA's training record keeps of the plan."""
    return {"steps": plan.label(), "placement": plan.placement, "predicted_peak_bytes": plan.predicted_peak_bytes,
            "budget_bytes": plan.budget_bytes, "budget_from": plan.budget_from, "fits": plan.fits,
            "optimizer": plan.optimizer, "quantization": plan.quantization, "checkpointing": plan.checkpointing,
            "blocks_swapped": plan.blocks_swapped, "phases": plan.phases, "reason": plan.reason}


__all__ = ["ACTIVATION_BYTES", "ADAMW_8BIT_STATE", "ADAMW_STATE", "BACKWARD_WIDTHS", "ENCODE_CHUNK", "QUANTIZATIONS",
           "STEPS", "TOKEN_WIDTHS", "UNET_ATTENTION_WIDTHS", "UNET_RESNET_WIDTHS", "Costs", "LoraRun", "Option",
           "TrainingModel", "TrainingPlan", "blocks", "describe", "encode_activations", "from_configs",
           "lora_layers", "lora_parameters", "matches", "plan_training", "record", "summary",
           "text_training_activations", "training_activations", "training_model"]
