"""The batched generation engine, the same for genkit-mini and any diffusers pipeline.

A call expands prompts × images into jobs; image i gets its own CPU `torch.Generator` seeded
`seed + i`, so an image's pixels depend on its prompt and seed only, never on the batch size
or on which process makes it. Jobs run in batches; results are yielded batch by batch.

A job may start from an input image (img2img), a mask (inpainting) or a padded canvas
(outpainting), or, on a model that edits by instruction, read one or more input images beside
its prompt ("instruct": no strength): the same engine runs the family's editing pipeline
(genkit.edit), and the record holds each input's path and sha256 so `genkit replay` can find
and check it.

Over 500 lines on purpose: planning (every check, before any work), batching (what may share a batch) and
recording (what an image depends on) are one invariant, read together; what differs by model lives in
genkit.families, exactness in genkit.invariance, edits in genkit.edit.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import secrets
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from genkit import checks, controlnet, edit, hires, ipadapter, memory, schedulers
from genkit.errors import GenkitError, term
from genkit.invariance import BatchInvariant, rows_apart
from genkit.prompts import PromptSpec, from_strings
from genkit.settings import SETTINGS, digest_key


@dataclass
class GenerationConfig:
    """Settings of one call; None means the model's default (its preset, else its own config). Its fields are
    genkit.settings' `per_call` ones (tests/test_settings.py)."""

    negative_prompt: str = ""  # what to steer away from (replaces the empty prompt in guidance)
    num_images_per_prompt: int = 1  # images per prompt (-n)
    batch_size: int = 8  # images per forward pass
    seed: int | None = None  # image i gets seed + i; None draws a random base seed
    num_inference_steps: int | None = None  # denoising steps (--steps)
    guidance_scale: float | None = None  # classifier-free guidance (--guidance); <= 1 turns it off
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None  # a short name from genkit.schedulers.NAMES, or "default" (the model's own)
    prompt_syntax: str | None = None  # "a1111" (the default: (word:1.3) weights, BREAK) or "plain" (genkit.prompt_syntax)
    # the hires fix (genkit.hires): a second, image-to-image pass at hires_scale times the size; None: none
    hires_scale: float | None = None
    hires_strength: float | None = None  # how much the second pass redraws; default 0.7 (A1111's)
    hires_steps: int | None = None  # the second pass's steps; 0 or None: the first pass's
    hires_upscaler: str | None = None  # "latent" (the default), "lanczos" or an upscaling model's file (spandrel)
    # ControlNet units (genkit.controlnet): a Control, "model=PATH,image=PATH,..." or a dict, or a list of them
    control: object = None
    # an IP-Adapter and its reference image (genkit.ipadapter): an IPAdapter or a dict of model, image, scale
    ip_adapter: object = None
    # editing (genkit.edit): an input image for every prompt (path, PIL image or array), a mask (white repaints),
    # the strength (0-1], or outpaint sides ("left=16,right=16"); a PromptSpec's own values win
    image: object = None
    mask: object = None
    strength: float | None = None  # default: 0.8 for img2img, 1.0 for inpainting (as diffusers)
    outpaint: object = None


@dataclass(frozen=True)
class Job:
    """One image to make: its index in the run and everything that decides its pixels (genkit.settings' `recorded`
    ones, tests/test_settings.py)."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    prompt_syntax: str | None = None  # how A1111's weight syntax in the prompt was read; None: it holds none
    hires_scale: float | None = None  # the hires fix (genkit.hires); None: none
    hires_strength: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None
    control: tuple | None = None  # ControlNet units (genkit.controlnet.Control, images read); None: none
    ip_adapter: object = None  # an IP-Adapter (genkit.ipadapter.IPAdapter, its image read); None: none
    image: edit.Picture | edit.Pictures | None = None  # the input of an edit (several: an instruction edit's)
    mask: edit.Picture | None = None  # white repaints (inpainting)
    strength: float | None = None
    outpaint: str | None = None  # "left=16,right=16": the input padded, the new border repainted

    @property
    def task(self) -> str | None:
        """None (text-to-image), "img2img", "inpaint" or "instruct" (an instruction edit: input images and no
        strength, the whole image drawn anew by the prompt; genkit.families' edit models)."""
        if self.image is None:
            return None
        if self.mask is not None or self.outpaint:
            return "inpaint"
        return "img2img" if self.strength is not None else "instruct"

    def batch_key(self) -> tuple:
        """What jobs of one batch share, whatever the model (`Pipeline.batch_key` adds what the model needs)."""
        return (self.num_inference_steps, self.guidance_scale, self.width, self.height, self.scheduler, self.task,
                self.strength, self.prompt_syntax, self.hires_scale, self.hires_strength, self.hires_steps,
                self.hires_upscaler, controlnet.batch_key(self.control), ipadapter.batch_key(self.ip_adapter))


@dataclass
class GenerationResult:
    """Images of one batch (or a whole call), with their seeds and full records."""

    images: list = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)

    def extend(self, other: "GenerationResult") -> None:
        self.images += other.images
        self.seeds += other.seeds
        self.metadata += other.metadata


@functools.lru_cache(maxsize=1)
def _versions() -> tuple:
    import diffusers
    import torch
    import transformers

    from genkit import __version__

    return (("genkit", __version__), ("torch", torch.__version__), ("diffusers", diffusers.__version__),
            ("transformers", transformers.__version__))


def versions() -> dict[str, str]:
    """The libraries' versions, for records (looked up once per process)."""
    return dict(_versions())


class Pipeline:
    """A loaded model plus genkit's engine: `generate`, `iter_generate`, `plan`.

    What differs between model families (denoiser, sizes, call arguments, attention) is asked of
    `self.family` (genkit.families); the engine itself never names a UNet or a family.
    """

    def __init__(self, pipe, *, name: str, family, defaults: dict, device: str, attention, exact: bool = True):
        self.pipe, self.name, self.family, self.device = pipe, name, family, device
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.base_scheduler_class = type(pipe.scheduler)
        self.defaults = {**family.defaults(pipe), **defaults}
        self.loras: list[dict] = []  # filled by genkit.lora when adapters are loaded
        self._edit_pipes: dict = {}  # task -> the family's editing pipeline, sharing this one's components
        self.controlnets: dict = {}  # path -> genkit.controlnet.Loaded, loaded when a job first asks for it
        self.ip_adapters: dict = {}  # weights file -> genkit.ipadapter.Loaded, likewise
        self.compiled = False
        self._cut: dict[str, dict | None] = {}  # prompt -> what its text encoder drops of it (prompt_cut)
        self._chunks: dict[tuple, int] = {}  # (prompt, weighted) -> the pieces it is read in (chunks_of)
        # a prompt past the text encoder's length: the family's first way ("chunk": CLIP's 75-token chunks, as A1111)
        self.long_prompts = family.long_prompts[0]
        self.exact = exact  # fixed-shape blocks for every shape-sensitive op (genkit.invariance); False: --fast
        self.attention = None
        self.set_attention(attention)
        self.memory_step = memory.Step()  # placement, VAE mode, batch cap (genkit.load applies a plan on CUDA)
        self.memory_model = self.memory_budget = None  # the planner's meta model and budget: an OOM's estimate

    @property
    def kind(self) -> str:
        """The model's file format: "genkit" (genkit-mini's own) or "diffusers"."""
        return self.family.file_format

    def set_long_prompts(self, mode: str) -> None:
        """"chunk" (A1111's 75-token chunks, the default for CLIP families) or "truncate" (diffusers' cut)."""
        if mode not in ("chunk", "truncate"):
            raise GenkitError(f"must be 'chunk' or 'truncate', got {mode!r}", param="long_prompts")
        if mode not in self.family.long_prompts:
            raise GenkitError(f"{mode}: {self.family.title} reads prompts with its own text encoder's length; "
                              "chunking is for CLIP models (SD 1.x/2.x, SDXL): drop it", param="long_prompts")
        self.long_prompts, self._cut = mode, {}

    def chunks_of(self, job: Job) -> int:
        """How many pieces the job's prompt and negative are read in (1: as the pipeline reads them)."""
        if self.long_prompts != "chunk":
            return 1
        weighted = job.prompt_syntax == "a1111"  # read with A1111's weights: its pieces counted without the syntax
        for text in (job.prompt, job.negative_prompt):
            if (text, weighted) not in self._chunks:
                self._chunks[text, weighted] = self.family.weighted_chunks(self.pipe, text) if weighted else \
                    self.family.chunks(self.pipe, text)
        return max(self._chunks[job.prompt, weighted], self._chunks[job.negative_prompt, weighted])

    def batch_key(self, job: Job) -> tuple:
        """What the jobs of one batch must share: settings, text pieces, and (where the family passes an empty negative
        as none) whether the negative is empty."""
        empty = not job.negative_prompt if self.family.empty_negative_is_zeros else None
        # an instruction edit's pipeline reads one set of input images for its whole batch
        inputs = tuple(p.sha256 for p in edit.references(job.image)) if job.task == "instruct" else None
        return (*job.batch_key(), self.chunks_of(job), empty, inputs)

    @property
    def denoiser(self):
        return self.family.denoiser(self.pipe)

    def set_attention(self, backend) -> None:
        """Use attention `backend` (a name or genkit.attention.Attention) from the next batch on, in this pipeline
        alone: what it may be is probed in this model's dtypes and head sizes on its device (genkit.attention.choose;
        auto says on stderr what it passed over), and the records say the backend that runs."""
        from genkit import attention

        backend = attention.choose(backend, self.family, self.pipe, self.device).backend
        self.family.apply_attention(self.pipe, backend)
        self.attention = backend

    def compile(self) -> "Pipeline":
        """Compile the UNet with torch.compile (PyTorch's inductor), in place; call it after loading LoRAs.

        The first batch pays the compile (about 40 s for genkit-mini on 2 CPU cores), and once more
        the first batch of a second size (compiled for any batch size from then on); later batches
        run faster (benchmarks/genkit_mini_speed.py), so it is worth it for long runs. Compiled
        kernels sum in another order: images are close to, not bitwise equal to, the eager ones,
        and no longer bitwise equal across batch sizes.
        """
        if self.device == "cpu":  # inductor writes C++ for the CPU; fail here, not inside the first batch
            from torch._inductor import cpp_builder, exc

            try:
                cpp_builder.get_cpp_compiler()
            except exc.InvalidCxxCompiler:
                raise GenkitError("on a CPU needs a C++ compiler for torch.compile and none was found "
                                  f"(install g++ or set CXX, or drop {term('compile')})", param="compile") from None
        self.denoiser.compile()
        self.compiled = True
        self.exact = False  # compiled kernels are not bitwise equal across batch sizes anyway, and tracing the
        # fixed-block mode would compile every block's copy of the graph (minutes on 2 cores)
        return self

    @property
    def size_factor(self) -> int:
        return self.family.multiple(self.pipe)

    @property
    def dtype(self):
        # the first floating parameter's, as diffusers answers, without its walk over every module (2 ms a record)
        found = next((p.dtype for p in self.denoiser.parameters() if p.is_floating_point()), None)
        return found if found is not None else self.denoiser.dtype

    # -- planning -------------------------------------------------------------------------
    def settings(self, config: GenerationConfig | None = None) -> dict:
        """What an image made with `config` would record (model, sampler, steps, size, dtype, device, ...), without
        making one: the record of a one-image plan."""
        return self.record(self.plan(["settings"], config)[0])

    def plan(self, prompts, config: GenerationConfig | None = None) -> list[Job]:
        """Validate settings and expand prompts × images into jobs, without running anything."""
        config = config or GenerationConfig()
        specs = from_strings([prompts] if isinstance(prompts, (str, PromptSpec)) else prompts)
        if not specs:
            raise GenkitError(f"no prompts given (pass at least one prompt or {term('prompts_file')})")
        base = self._settings(config)
        seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
        checks.check_count(config.num_images_per_prompt, "num_images_per_prompt")
        checks.check_count(config.batch_size, "batch_size")
        jobs, read = [], {}
        for spec in specs:
            if not spec.prompt.strip():
                raise GenkitError("is empty (remove it or write some text)", param="prompt")
            n = spec.num_images_per_prompt or config.num_images_per_prompt
            checks.check_count(n, "num_images_per_prompt")
            steps = spec.num_inference_steps or base["num_inference_steps"]
            guidance = spec.guidance_scale if spec.guidance_scale is not None else base["guidance_scale"]
            self._check_numbers(steps, guidance)
            width, height = (self._check_side(key, getattr(spec, key) or base[key]) for key in ("width", "height"))
            scheduler = self._sampler(spec.scheduler) if spec.scheduler else base["scheduler"]
            edits = self._edit(spec, config, steps, read)
            negative = spec.negative_prompt if spec.negative_prompt is not None else base["negative_prompt"]
            edits.update(self._prompt_syntax(spec, config, negative),
                         **self._hires(spec, config, steps, width, height, bool(edits)))
            own = getattr(spec, "control", None)
            edits.update(controlnet.plan(self, own if own is not None else config.control, edits, read))
            edits.update(ipadapter.plan(self, config.ip_adapter, edits, read))
            first = spec.seed if spec.seed is not None else seed + len(jobs)
            checks.check_seed(first)
            checks.check_seed(first + n - 1)  # the prompt's seeds run from first to first + n - 1
            for k in range(n):
                image_seed = first + k
                jobs.append(Job(
                    index=len(jobs), prompt=spec.prompt, negative_prompt=negative, seed=image_seed, num_inference_steps=steps, guidance_scale=float(guidance),
                    scheduler=scheduler, **{"width": width, "height": height, **edits},
                ))
                self.family.check_job(jobs[-1])
        sizes = {}
        for job in jobs:
            sizes[(job.width, job.height)] = sizes.get((job.width, job.height), 0) + 1
        for job in jobs:
            if job.hires_scale is not None:  # a hires image is made at its output size too
                size = hires.size(job.width, job.height, job.hires_scale, self.size_factor)
                sizes[size] = sizes.get(size, 0) + 1
        for (width, height), count in sizes.items():  # sides and a batch's memory, before anything is allocated
            _check_size(self, width, height, min(config.batch_size, count))
        return jobs

    def _prompt_syntax(self, spec: PromptSpec, config: GenerationConfig, negative: str) -> dict:
        """The job's prompt_syntax: None when neither text holds A1111's syntax (read as plain text either way), else
        how it is read; a weighted prompt the family cannot read is refused in one line."""
        from genkit import prompt_syntax

        syntax = prompt_syntax.check_syntax(spec.prompt_syntax if spec.prompt_syntax is not None
                                            else config.prompt_syntax)
        texts = [text for text in (spec.prompt, negative) if prompt_syntax.has_syntax(text)]
        if not texts:
            return {}
        if syntax == "a1111":
            if not self.family.prompt_weights:
                raise GenkitError(f"{texts[0]!r} uses A1111's weight syntax ((word:1.3), [word], BREAK), which "
                                  f"{self.family.title} models cannot read: their text encoder takes no weights; drop "
                                  f"the weights or pass {term('prompt_syntax')} plain to read brackets as text",
                                  param="prompt")
            self.family.check_weights()
        return {"prompt_syntax": syntax}

    def _hires(self, spec: PromptSpec, config: GenerationConfig, steps: int, width: int, height: int,
               edits: bool) -> dict:
        """The job's hires-fix fields (genkit.hires), checked before any work; {} without one."""
        def own(key):
            value = getattr(spec, key, None)
            return value if value is not None else getattr(config, key)

        scale, strength, hires_steps, upscaler = (own(key) for key in ("hires_scale", "hires_strength", "hires_steps",
                                                                      "hires_upscaler"))
        if scale is None:
            for key, value in (("hires_strength", strength), ("hires_steps", hires_steps), ("hires_upscaler", upscaler)):
                if value is not None:
                    raise GenkitError(f"{value} applies only to the hires fix (pass {term('hires_scale')} SCALE, or "
                                      f"drop {term(key)})", param=key)
            return {}
        scale = hires.check_scale(scale)
        if edits:
            raise GenkitError(f"{scale:g}: the hires fix makes an image from text; it does not edit an input image "
                              f"(drop {term('hires_scale')} or {term('image')})", param="hires_scale")
        if "img2img" not in self.family.edit_tasks:
            raise GenkitError(f"{scale:g}: the hires fix's second pass is image-to-image, and {self.family.title} "
                              f"models have no img2img pipeline in diffusers (drop {term('hires_scale')})",
                              param="hires_scale")
        strength = hires.check_strength(hires.STRENGTH if strength is None else strength)
        hires_steps = hires.check_steps(0 if hires_steps is None else hires_steps)
        hires.check_steps_kept(hires_steps or steps, strength)
        upscaler = hires.check_upscaler(upscaler)
        for key, side in zip(("width", "height"), hires.size(width, height, scale, self.size_factor)):
            checks.check_side(side, key, f"{term('hires_scale')} {scale:g} makes a {key} of {side}, but the {key}")
        return {"hires_scale": scale, "hires_strength": strength, "hires_steps": hires_steps, "hires_upscaler": upscaler}

    def _edit(self, spec: PromptSpec, config: GenerationConfig, steps: int, read: dict) -> dict:
        """The job fields of a prompt's edit (input, mask, strength, outpaint, and the size they give), checked
        before any work; {} for text-to-image. `read` holds each input once per plan."""
        from genkit import families, images

        def own(key):
            value = getattr(spec, key, None)
            return value if value is not None else getattr(config, key)

        source, mask_source, strength, outpaint = own("image"), own("mask"), own("strength"), own("outpaint")
        if source is None:
            if mask_source is not None or outpaint is not None:
                raise GenkitError(f"needs an input image to edit (pass {term('image')})",
                                  param="mask" if mask_source is not None else "outpaint")
            if strength is not None:
                raise GenkitError(f"{strength} applies only to an input image (pass {term('image')}, or drop "
                                  f"{term('strength')})", param="strength")
            return {}
        if mask_source is not None and outpaint is not None:
            raise GenkitError(f"makes its own mask (the new border); pass {term('mask')} or {term('outpaint')}, not both",
                              param="outpaint")
        if mask_source is not None or outpaint is not None:
            task = "inpaint"
        else:  # no strength: the model's instruction edit where it has one
            task = "instruct" if strength is None and "instruct" in self.family.edit_tasks else "img2img"
        self.family.check_edit(task)
        image = edit.picture(source, "image", read)
        if task == "instruct":  # the output has the (first) input's size unless told
            width, height = images.target_size(edit.references(image)[0].pixels.size, spec.width or config.width,
                                               spec.height or config.height, self.size_factor)
            return {"image": image, "width": width, "height": height}
        if isinstance(image, edit.Pictures):
            have = [f.name for f in families.all_families() if "instruct" in f.edit_tasks]
            raise GenkitError(f"{len(image.items)} input images: {task} edits one; several are read by models that "
                              f"edit by instruction (families: {', '.join(have)})", param="image")
        strength = edit.check_strength(edit.default_strength(task == "inpaint") if strength is None else strength)
        edit.check_kept_steps(steps, strength)
        size, mask = image.pixels.size, None
        if outpaint is not None:
            pads = edit.parse_outpaint(outpaint)
            outpaint = edit.outpaint_text(pads)
            size = (size[0] + pads["left"] + pads["right"], size[1] + pads["top"] + pads["bottom"])
        if mask_source is not None:
            mask = edit.picture(mask_source, "mask", read)
            edit.check_mask(mask, size)
        width, height = images.target_size(size, spec.width or config.width, spec.height or config.height,
                                           self.size_factor)
        return {"image": image, "mask": mask, "strength": strength, "outpaint": outpaint, "width": width,
                "height": height}

    def _settings(self, config: GenerationConfig) -> dict:
        chosen = {key: getattr(config, key) for key in ("num_inference_steps", "guidance_scale", "width", "height",
                                                      "scheduler")}
        settings = {**self.defaults, **{k: v for k, v in chosen.items() if v is not None}}
        if config.negative_prompt:
            settings["negative_prompt"] = config.negative_prompt
        settings["scheduler"] = self._sampler(settings["scheduler"])
        for key in ("width", "height"):
            self._check_side(key, settings[key])
        self._check_numbers(settings["num_inference_steps"], settings["guidance_scale"])
        return settings

    def _sampler(self, name: str) -> str:
        """The sampler's short name, refused in one line when the family's pipelines cannot run it."""
        if name == "default":
            return name
        sampler = schedulers.parse(name, flow=self.family.flow).value
        if sampler not in self.family.samplers():
            also = "" if str(name).strip().lower() == sampler else f" ({sampler})"
            raise GenkitError(f"{name}{also} does not run on {self.family.title} models; the samplers that fit: "
                              f"{', '.join(self.family.samplers())}, or default", param="scheduler")
        return sampler

    def _check_side(self, key: str, value) -> int:
        return checks.check_multiple(key, value, self.size_factor, f" for {self.name}")

    @staticmethod
    def _check_numbers(steps, guidance) -> None:
        checks.check_steps(steps)
        checks.check_guidance(guidance)

    # -- running --------------------------------------------------------------------------
    def iter_generate(
        self,
        prompts,
        config: GenerationConfig | None = None,
        *,
        jobs: list[Job] | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = False,
        **settings,
    ) -> Iterator[GenerationResult]:
        """Yield one `GenerationResult` per batch as it finishes.

        `jobs` replaces planning (used to run one process's share of a larger plan, or to resume a run
        with the images still missing).
        """
        from genkit.progress import progress_bar

        config = replace(config or GenerationConfig(), **settings)
        jobs = self.plan(prompts, config) if jobs is None else jobs
        bar = progress_bar(total=len(jobs), unit="img", desc="generate", progress=progress, leave=False)
        encoded: dict = {}  # each distinct prompt's text encoding, once per run (genkit.invariance.rows_apart)
        # a long run starts with a batch of one, so its first image comes in about one image's time, not a whole
        # batch's (batch size never changes pixels in exact mode; see genkit.invariance)
        first = 1 if len(jobs) > LONG_RUN * config.batch_size else config.batch_size
        for number, batch in enumerate(_batches(jobs, config.batch_size, first, self.batch_key)):
            result = self._fitting(batch, number, callback, encoded)
            bar.update(len(batch))
            yield result
        bar.close()

    def generate(self, prompts, config: GenerationConfig | None = None, **settings) -> GenerationResult:
        """Generate every image and return them together (see `iter_generate`)."""
        total = GenerationResult()
        for result in self.iter_generate(prompts, config, **settings):
            total.extend(result)
        return total

    def _fitting(self, batch: list[Job], number: int, callback, encoded: dict) -> GenerationResult:
        """`_run_batch` at most `memory_step.batch` images a call. A batch that runs out of memory is retried once with
        the next step (genkit.memory.next_step: VAE slicing or tiling, more offload, half the batch), which later
        batches keep, said on stderr; out of memory again, or no step left: one line (genkit.memory.ran_out)."""
        step = self.memory_step
        where = self._batch_in_pieces(batch, number, callback, encoded, step)
        if isinstance(where, GenerationResult):
            return where
        retry = memory.next_step(step, where, min(len(batch), step.batch or len(batch)), self.pipe, batch[0].width,
                                 batch[0].height, self.device.startswith("cuda") and self.memory_model is not None)
        if retry is None:
            raise memory.ran_out(self, step, batch, self.memory_model, self.memory_budget)
        print(f"genkit: out of memory in the {where} of {len(batch)} image(s) with {step.label()}; retrying with "
              f"{retry.label()}", file=sys.stderr)
        if (retry.placement, retry.vae) != (step.placement, step.vae):
            memory.apply(self.pipe, retry, self.device)
        self.memory_step = retry
        result = self._batch_in_pieces(batch, number, callback, encoded, retry)
        if not isinstance(result, GenerationResult):
            raise memory.ran_out(self, retry, batch, self.memory_model, self.memory_budget)
        return result

    def _batch_in_pieces(self, batch: list[Job], number: int, callback, encoded: dict, step) -> "GenerationResult | str":
        """The batch's images, `step.batch` at a time; or where it ran out of memory, with what it held freed."""
        import torch

        result, size = GenerationResult(), step.batch or len(batch)
        try:
            for start in range(0, len(batch), size):
                result.extend(self._run_batch(batch[start:start + size], number, callback, encoded))
            return result
        except memory.RanOut as ran_out:
            where = ran_out.where
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return where

    def _run_batch(self, batch: list[Job], number: int, callback, encoded: dict | None = None) -> GenerationResult:
        import torch

        first = batch[0]
        pipe = controlnet.pipe_for(self, first) if first.control else ipadapter.pipe_for(self, first) \
            if first.ip_adapter else self._pipe_for(first.task)
        pipe.scheduler = self._scheduler(first.scheduler)  # fresh: schedulers keep per-call state
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in batch]

        steps = first.num_inference_steps if first.task in (None, "instruct") else \
            edit.kept_steps(first.num_inference_steps, first.strength)  # an edit runs the last steps only
        if first.hires_scale is not None:  # and the hires fix's second pass runs after it
            steps += edit.kept_steps(hires.second_steps(first), first.hires_strength)

        last = {"step": 0}  # the last step's latents (a reference), decoded again in fp32 if the VAE made NaN

        def on_step(pipe, step, timestep, tensors):
            last["latents"], last["step"] = tensors.get("latents"), last["step"] + 1
            if callback is not None:
                callback({"batch": number, "step": last["step"], "steps": steps,
                          "images": [job.index for job in batch]})
            return tensors

        made, inputs = batch, None  # the jobs as the last pass made them (the hires fix: at the output size)
        # an instruction edit's text encoder may read its images too (Qwen2.5-VL), which rows_apart cannot split by
        # prompt: the families' edit pipelines encode each prompt alone instead
        apart = self.family.text_encoders(self.pipe) if self.exact and first.task != "instruct" else ()
        with (BatchInvariant() if self.exact else contextlib.nullcontext()), rows_apart(*apart, memo=encoded), \
                self.family.attention_context(self.attention), ipadapter.installed(self, first):
            extra = {}
            if first.task == "instruct":  # the input images as read: the pipeline sizes them as its model wants
                extra["image"] = [picture.pixels for picture in edit.references(first.image)]
            elif first.task is not None:
                inputs = [edit.inputs_for(job.image, job.mask, job.outpaint, job.width, job.height, self.size_factor)
                          for job in batch]
                extra.update(image=[image for image, _ in inputs], strength=first.strength)
                if first.task == "inpaint":
                    extra["mask_image"] = [mask for _, mask in inputs]
            if first.control:  # each row's control images, the weights and bounds (genkit.controlnet)
                extra.update(controlnet.call_args(self, pipe, batch, generators))
            if first.ip_adapter:  # the reference image (genkit.ipadapter), the scale set by `installed`
                extra.update(ipadapter.call_args(self, pipe, batch))
            if first.hires_scale is None:
                output = self._call(pipe, batch, generators, on_step, extra, last, steps)
            else:
                pipe, made, output = self._hires_fix(batch, generators, on_step, last, steps)
            images, upcast = _finite(self, pipe, made, output, last.get("latents"))
        images = _pil(images)
        if first.task == "inpaint":  # the known region is the input's pixels (latent models only come close)
            images = [_keep_known(out, image, mask) for out, (image, mask) in zip(images, inputs)]
        return GenerationResult(images=images, seeds=[job.seed for job in batch],
                                metadata=[{**self.record(job), **({"vae_upcast": True} if up else {})}
                                          for job, up in zip(batch, upcast)])

    def _call(self, pipe, batch: list[Job], generators, on_step, extra: dict, last: dict, steps: int,
              output_type: str = "np"):
        """One pipeline call for the batch (its text as the family reads it, `extra` an edit's inputs): its images."""
        import torch

        first = batch[0]
        args = {**self.family.call_args(batch, generators, on_step), "output_type": output_type}  # "np": floats,
        # checked for NaN before they become the pixels "pil" would have made (the same numpy_to_pil)
        chunks = self.chunks_of(first)  # a batch shares its chunk count and prompt syntax (batch_key)
        if first.prompt_syntax == "a1111":  # A1111's weights (genkit.prompt_syntax), in as many chunks
            args = self.family.weighted_args(self.pipe, batch, chunks, args)
        elif chunks > 1:
            args = self.family.chunked_args(self.pipe, batch, chunks, args)
        if extra:
            args = _accepted(pipe, {**args, **extra})
        try:
            return pipe(**args).images
        except torch.OutOfMemoryError:  # every step had run: the decode ran out; else the denoising
            raise memory.RanOut("decode" if last.get("step") == steps else "denoising") from None

    def _hires_fix(self, batch: list[Job], generators, on_step, last: dict, steps: int):
        """(img2img pipeline, the jobs at the output size, its output): A1111's hires fix (genkit.hires). The first pass
        at the jobs' size, the upscale, then image-to-image at the output size with each image's generator going on
        from where the first pass left it."""
        first = batch[0]
        width, height = hires.size(first.width, first.height, first.hires_scale, self.size_factor)
        if first.hires_upscaler == "latent":
            output = self._call(self.pipe, batch, generators, on_step, {}, last, steps, self.family.hires_output)
            image = self.family.hires_latents(self.pipe, output, first.width, first.height, width, height)
        else:
            output = self._call(self.pipe, batch, generators, on_step, {}, last, steps)
            pixels, _ = _finite(self, self.pipe, batch, output, last.get("latents"))
            image = hires.upscale(_pil(pixels), first.hires_upscaler, width, height, self.device)
        made = [replace(job, width=width, height=height, num_inference_steps=hires.second_steps(job)) for job in batch]
        pipe = self._pipe_for("img2img")
        pipe.scheduler = self._scheduler(first.scheduler)
        last.pop("latents", None)
        output = self._call(pipe, made, generators, on_step, {"image": image, "strength": first.hires_strength}, last,
                            steps)
        return pipe, made, output

    def _pipe_for(self, task: str | None):
        """The pipeline that runs `task`: this one for text-to-image, else the family's editing pipeline."""
        if task is None:
            return self.pipe
        if task not in self._edit_pipes:
            self._edit_pipes[task] = self.family.edit_pipe(self.pipe, task)
        return self._edit_pipes[task]

    def _scheduler(self, name: str):
        if name == "default":
            return schedulers.fresh(self.base_scheduler_class, self.base_scheduler_config)
        return schedulers.build(schedulers.parse(name, flow=self.family.flow), self.base_scheduler_config)

    def record(self, job: Job) -> dict:
        """Everything needed to make this image again (its keys: genkit.outputs.RECORD)."""
        return {
            "index": job.index, **_settings_record(job, of_edit=False), "model": self.name,
            "family": self.family.name,
            "lora": list(self.loras), "attention": self.attention.value, "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device, "exact": self.exact, "threads": _threads(),
            "versions": versions(), "memory_plan": self.memory_step.label(), **({"compiled": True} if self.compiled else {}), **_settings_record(job, of_edit=True),
            **({"prompt_truncated": cut} if (cut := self.prompt_cut(job.prompt)) else {}),
            **({"prompt_unknown_words": words} if (words := self.family.prompt_notice(self.pipe, job.prompt)) else {}),
            **({"prompt_chunks": chunks} if (chunks := self.chunks_of(job)) > 1 else {}),
            **({"quantization": quantized} if (quantized := getattr(self, "quantization", None)) else {}),
        }

    def prompt_cut(self, prompt: str) -> dict | None:
        """What the text encoder drops of a prompt longer than it reads: {"tokens": kept, "dropped": text}, else
        None. Said once per prompt as a warning (the pipelines cut silently), and recorded with each image."""
        if prompt not in self._cut:
            self._cut[prompt] = cut = self.family.prompt_cut(self.pipe, prompt, self.long_prompts)
            if cut:
                import warnings

                from genkit.prompts import PromptWarning

                def short(text):
                    return text if len(text) <= 60 else text[:57] + "..."

                warnings.warn(PromptWarning(
                    f"prompt {short(prompt)!r} is longer than the {cut['tokens']} tokens {self.name}'s text encoder "
                    f"reads; {short(cut['dropped'])!r} is ignored (shorten the prompt)"), stacklevel=2)
        return self._cut[prompt]


def _settings_record(job: Job, of_edit: bool) -> dict:
    """The job's recorded settings (genkit.settings), those of an edit or the others; an edit's only where it has
    them, each input as where it was read from and its sha256."""
    out = {}
    for setting in SETTINGS:
        if not setting.recorded or setting.edit != of_edit:
            continue
        value = getattr(job, setting.name)
        if (setting.edit or setting.optional) and value is None:
            continue
        if setting.digest:
            out.update({setting.name: value.source, digest_key(setting.name): value.sha256})
        elif isinstance(value, tuple) and value and hasattr(value[0], "record"):  # ControlNet units
            out[setting.name] = [unit.record() for unit in value]
        elif hasattr(value, "record"):  # an IP-Adapter
            out[setting.name] = value.record()
        else:
            out[setting.name] = value
    return out


def _keep_known(generated, image, mask):
    """The generated image where the mask is white, the input where it is black."""
    from PIL import Image

    return Image.composite(generated.convert("RGB"), image.convert("RGB"), mask.convert("L"))


def _finite(pipeline: Pipeline, pipe, batch: list[Job], images, latents):
    """(images, upcast): the batch's floats in [0, 1] (batch, h, w, 3) with no NaN, and for each whether its VAE
    decoded in fp32. An image that came out NaN from finite latents is decoded again in fp32 (its VAE overflowed in
    fp16); NaN or infinite latents are the denoiser's: refused in one line naming the dtype to use. Costs one sum of
    the floats and one check of the latents per batch; pixels as before wherever nothing was NaN."""
    import numpy as np
    import torch

    upcast = [pipeline.family.vae_upcast(pipe)] * len(batch)
    nan = ~np.isfinite(images.reshape(len(batch), -1).sum(axis=1))  # NaN survives the [0, 1] clamp; inf does not
    finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist() if latents is not None else (~nan).tolist()
    for job, ok in zip(batch, finite):
        if not ok:
            raise _made_nan(pipeline, job, "latents")
    rows = np.flatnonzero(nan)
    if rows.size:
        vae = getattr(pipe, "vae", None)
        dtype = vae.dtype if vae is not None else None
        try:
            if vae is not None:
                vae.to(torch.float32)
            with torch.no_grad():
                decoded = pipeline.family.decode(pipe, latents[torch.as_tensor(rows)].float(), batch[0].width,
                                                 batch[0].height)
        finally:
            if vae is not None:
                vae.to(dtype)
        again = (decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # as diffusers' postprocess
        for row, pixels in zip(rows, again):
            if not np.isfinite(pixels).all():
                raise _made_nan(pipeline, batch[row], "VAE's pixels, even in fp32")
            images[row], upcast[row] = pixels, True
    return images, upcast


def _made_nan(pipeline: Pipeline, job: Job, what: str) -> GenkitError:
    """`what` ("latents": the text encoders' and denoiser's work; or the VAE's pixels in fp32) holds NaN or infinity:
    in a half dtype, an overflow, so the dtype to use instead; in fp32, weights that hold NaN."""
    from genkit.loader import SHORT

    dtype, where = SHORT[str(pipeline.dtype).removeprefix("torch.")], f"image {job.index} (seed {job.seed})"
    wider = [name for name in ("bf16", "fp32") if name in pipeline.family.dtypes and name != dtype]
    if what != "latents" or dtype == "fp32" or not wider:
        return GenkitError(f"{pipeline.name}: its {what} came out NaN for {where} in fp32, so its weights hold NaN or "
                           "infinity: download or save the model again (nothing of this batch was saved)", param="model")
    return GenkitError(f"{dtype}: {pipeline.family.title} overflows in it: {where} came out of the denoiser as NaN "
                       f"(a black image), so nothing of this batch was saved; pass {term('dtype')} {' or '.join(wider)}",
                       param="dtype")


def _pil(images) -> list:
    """Floats in [0, 1], (batch, h, w, c), as the PIL images a pipeline's output_type "pil" makes of them."""
    from diffusers.utils import numpy_to_pil

    return numpy_to_pil(images)


def _accepted(pipe, args: dict) -> dict:
    """The call's arguments this pipeline takes (img2img pipelines size the output from the input, not width=)."""
    import inspect

    parameters = inspect.signature(type(pipe).__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return args
    return {key: value for key, value in args.items() if key in parameters}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


LONG_RUN = 4  # batches: a run longer than this starts with a batch of one


def _batches(jobs: list[Job], size: int, first: int | None = None, key=Job.batch_key):
    """Consecutive jobs that share `key(job)` (steps, guidance, size, scheduler, ...), at most `size` at a time
    (`first` for the first batch)."""
    batch: list[Job] = []
    limit = first or size
    for job in jobs:
        if batch and (len(batch) == limit or key(job) != key(batch[0])):
            yield batch
            batch, limit = [], size
        batch.append(job)
    if batch:
        yield batch


def _check_size(pipeline, width: int, height: int, batch_size: int) -> None:
    from genkit.cpu import check_size

    check_size(pipeline, width, height, batch_size)
