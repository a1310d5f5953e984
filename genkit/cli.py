"""The `genkit` command: each subcommand parses flags, calls one library function, prints the result.

torch, diffusers and transformers are imported inside the commands, so `genkit --help`
answers at once. User mistakes (`GenkitError`) print as one line and exit with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from genkit.errors import GenkitError
from genkit.presets import DEFAULT_MODEL

SCHEDULER_HELP = "ddim, euler, euler-a, dpm++, unipc, ddpm, or default (the model's own)"


class GenkitGroup(click.Group):
    """Turns GenkitError into `Error: <message>` and exit code 2, with no traceback; the setting it is about (its
    `param`) is named by its flag."""

    def invoke(self, ctx):
        from genkit.errors import command_line, flag

        try:
            with command_line():  # library errors name settings by their flags here
                return super().invoke(ctx)
        except GenkitError as exc:
            from genkit.distributed import rank_prefix

            click.echo(f"Error: {rank_prefix()}{exc.naming(exc.param and flag(exc.param))}", err=True)
            ctx.exit(2)


def _quiet_libraries() -> None:
    """Library chatter (deprecations, loading bars) off: stderr keeps genkit's own progress and errors."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(key, "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    _one_line_warnings()


def _one_line_warnings() -> None:
    """genkit's own warnings (a skipped training image ...) as `genkit: warning: <message>`, without the source
    file, line and code line Python prints by default."""
    import warnings

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"genkit: warning: {message}\n"

    def show(message, category, filename, lineno, file=None, line=None):
        from tqdm.auto import tqdm

        tqdm.write(f"genkit: warning: {message}", file=file or sys.stderr)  # above a progress bar, not inside it

    warnings.showwarning = show


@click.group(cls=GenkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genkit")
@click.option("--threads", default=None, metavar="N|auto",
              help="CPU threads: N, or auto for the cores free now (env GENKIT_THREADS). Unset, --fast takes the "
                   "free cores and --exact keeps torch's count (pixels differ by thread count) and says when cores "
                   "are busy.")
def main(threads):
    """genkit: text-to-image generation and LoRA fine-tuning on diffusers models.

    With no --model, genkit uses genkit-mini, a 32x32 shapes model that runs offline on a CPU.
    """
    if threads is not None:
        from genkit.cpu import parse_threads

        os.environ["GENKIT_THREADS"] = str(parse_threads(threads))


def model_options(f):
    f = click.option("--allow-pickle", is_flag=True, help="Allow .bin/.ckpt pickle weights (they can run code).")(f)
    f = click.option("--dtype", default=None,
                     help="fp32, fp16 or bf16, as the model's family runs (default on CUDA: bf16 for Flux, SD3, SANA, "
                          "Chroma, else fp32 without bf16; fp16 for SD, SDXL, PixArt; elsewhere fp32).")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available).")(f)
    f = click.option("--attention", default="auto", show_default=True,
                     help="auto, sdpa, math, sliced, xformers, flash, flash3 or sage (genkit info: which run "
                          "here).")(f)
    f = click.option("--models-dir", default=None, metavar="DIR", expose_value=False, callback=_models_dir,
                     help="A1111's or ComfyUI's folder (which holds models/): --model NAME and --lora NAME are found "
                          "in its checkpoint and LoRA folders (env GENKIT_MODELS_DIR).")(f)
    f = click.option("--model", "-m", envvar="GENKIT_MODEL", default=None,
                     help="Preset name, diffusers folder, hub id, or a single .safetensors checkpoint or transformer "
                          "file (env GENKIT_MODEL; default genkit-mini).")(f)
    return f


def _models_dir(ctx, param, value):
    """--models-dir: the models folder every load of this command reads ($GENKIT_MODELS_DIR; genkit.single_file), set
    for the command alone (a program that runs several commands, as the tests do, gets its own setting back)."""
    if value is not None:
        before = os.environ.get("GENKIT_MODELS_DIR")
        os.environ["GENKIT_MODELS_DIR"] = value

        def restore():
            if before is None:
                os.environ.pop("GENKIT_MODELS_DIR", None)
            else:
                os.environ["GENKIT_MODELS_DIR"] = before

        ctx.call_on_close(restore)
    return value


@main.command()
@click.argument("prompts", nargs=-1)
@click.option("--prompts-file", "-f", type=click.Path(dir_okay=False), help="Text (one per line) or .jsonl file.")
@click.option("--num-images", "-n", "num_images_per_prompt", default=1, show_default=True, help="Images per prompt.")
@click.option("--batch-size", "-b", default=8, show_default=True, help="Images per forward pass.")
@click.option("--seed", "-s", type=int, default=None, help="Base seed; image i gets seed + i (default: random).")
@click.option("--steps", "num_inference_steps", type=int, default=None, help="Denoising steps (model default).")
@click.option("--guidance", "guidance_scale", type=float, default=None, help="Classifier-free guidance scale.")
@click.option("--negative", "negative_prompt", default="", help="Negative prompt.")
@click.option("--width", "-W", type=int, default=None)
@click.option("--height", "-H", type=int, default=None)
@click.option("--scheduler", default=None, help=SCHEDULER_HELP)
@click.option("--image", "-i", multiple=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="Edit this image instead of starting from noise (img2img). It is resized (never cropped) to "
                   "--width x --height, or without them to its own size rounded down to the model's size multiple. "
                   "On a model that edits by instruction (Qwen-Image-Edit, Flux.2 [klein]) and without --strength, the "
                   "prompt says what to change; repeatable there: several input images.")
@click.option("--strength", type=float, default=None,
              help="How much of --image to redraw, in (0, 1]: small stays close to it, 1 redraws from noise "
                   "(default 0.8; 1.0 with --mask or --outpaint).")
@click.option("--mask", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Inpaint: repaint where this mask is white, keep --image's pixels where it is black "
                   "(same size as --image).")
@click.option("--outpaint", default=None, metavar="SIDES",
              help="Extend --image's canvas and paint the new border, e.g. right=16 or left=16,top=8 "
                   "(pixels per side; a bare number pads all four).")
@click.option("--prompt-syntax", "prompt_syntax", type=click.Choice(["a1111", "plain"]), default=None,
              help="a1111 (the default): A1111's prompt weights, (word:1.3), (word), [word], \\( and BREAK, on "
                   "SD 1.x/2.x and SDXL (compel); plain: brackets are text.")
@click.option("--hires", "hires_scale", type=float, default=None, metavar="SCALE",
              help="A1111's hires fix: make the image, upscale it SCALE times (sides rounded to the model's multiple), "
                   "and redraw it with image-to-image.")
@click.option("--hires-strength", "hires_strength", type=float, default=None,
              help="How much the hires pass redraws, in (0, 1] (A1111's denoising strength; default 0.7).")
@click.option("--hires-steps", "hires_steps", type=int, default=None,
              help="The hires pass's steps (default 0: as many as --steps; it runs steps x strength of them).")
@click.option("--hires-upscaler", "hires_upscaler", default=None, metavar="latent|lanczos|FILE",
              help="latent (the default: the latents resized), lanczos (the pixels), or an upscaling model file "
                   "(ESRGAN & co., read by spandrel: pip install 'genkit[upscale]').")
@click.option("--control", "control", multiple=True, metavar="model=PATH,image=PATH[,...]",
              help="ControlNet: steer with a control image; keys model (a ControlNet folder or .safetensors file), "
                   "image, preprocessor (canny: pip install 'genkit[controlnet]'; none: a ready map), weight (0-2, "
                   "default 1), start and end (fractions of the steps); repeatable: several at once.")
@click.option("--ip-adapter", "ip_adapter", default=None, metavar="PATH",
              help="IP-Adapter (SD 1.x/2.x, SDXL, Flux.1): its .safetensors file (or a folder holding one), with the "
                   "CLIP image encoder in image_encoder/ beside it; steers with --ip-image.")
@click.option("--ip-image", "ip_image", default=None, metavar="IMAGE[:SCALE]",
              help="The IP-Adapter's reference image, and its scale (0-2, default 1; 0 is no adapter).")
@model_options
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]", help="LoRA folder or file; repeatable.")
@click.option("--quantize", default=None, metavar="KIND|PART=KIND,...",
              help="Weight-only quantization as the model loads: int8 or fp8 (torchao, any device), nf4 (bitsandbytes, "
                   "CUDA); one kind quantizes the denoiser, or name parts: denoiser=int8,text_encoders=fp8.")
@click.option("--base", default=None, metavar="FOLDER",
              help="With --model FILE.gguf (a quantized denoiser alone) or FILE.safetensors (a checkpoint or a "
                   "transformer alone): the pipeline folder, preset or hub id its configs and other components come "
                   "from (a checkpoint's default: its family's preset, if on this machine).")
@click.option("--vae-slicing", is_flag=True, help="Decode one image at a time (SD-family models).")
@click.option("--vae-tiling", is_flag=True, help="Decode in tiles, for large sizes (SD-family models).")
@click.option("--cpu-offload", is_flag=True, help="Keep models on the CPU until used (CUDA only; overrides the plan).")
@click.option("--memory", default=None, metavar="AMOUNT", callback=lambda ctx, param, value: _memory_amount(ctx, param, value),
              help="CUDA: plan the placement for this much GPU memory, like 12GiB (default: what is free now).")
@click.option("--compile", is_flag=True, help="torch.compile the UNet: slow first batch, faster after (long runs).")
@click.option("--exact/--fast", default=None,
              help="--exact: an image's pixels never depend on its batch-mates or the batch size (the default on a "
                   "CPU; refused on CUDA, where it does not hold); --fast: skip that guard (the default on a GPU, "
                   "where batching is the speed; see the README's Seeds section).")
@click.option("--long-prompts", type=click.Choice(["chunk", "truncate"]), default=None,
              help="A prompt past CLIP's 75 tokens (SD 1.x/2.x, SDXL): chunk reads all of it in 75-token chunks as "
                   "A1111 does (the default); truncate cuts it as diffusers does (said and recorded).")
@click.option("--out", "-o", default="outputs", show_default=True, type=click.Path(), help="Output folder.")
@click.option("--grid", is_flag=True, help="Also write grid.png with every image of the run.")
@click.option("--overwrite", is_flag=True, help="Regenerate images that already exist in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per image instead of paths.")
@click.option("--processes", type=int, default=None,
              help="Split the run over N processes (same as: accelerate launch --num_processes N -m genkit ...).")
def generate(prompts, prompts_file, out, grid, overwrite, quiet, as_json, processes, **options):
    """Generate images for PROMPTS (or --prompts-file) into --out."""
    from genkit import distributed
    from genkit.prompts import from_strings, read_prompts_file
    from genkit.run import GenerateRequest, check_request, run_generate

    if processes is not None and not distributed.launched():
        sys.exit(distributed.relaunch(processes, distributed.without_option(sys.argv[1:], "--processes")))
    if prompts and prompts_file:
        raise GenkitError("give prompts as arguments or with --prompts-file, not both")
    specs = read_prompts_file(prompts_file) if prompts_file else from_strings(prompts)
    if not specs:
        raise GenkitError('no prompts given (try: genkit generate "a red circle on the left")')
    from genkit.controlnet import units

    options["control"] = units(options["control"]) or None  # each unit checked before the model loads
    from genkit.ipadapter import from_cli

    options["ip_adapter"] = from_cli(options["ip_adapter"], options.pop("ip_image"))  # checked, likewise
    images = options["image"]  # several: an instruction edit's input images
    options["image"] = images[0] if len(images) == 1 else tuple(images) or None
    request = GenerateRequest(prompts=specs, out=out, overwrite=overwrite, grid=grid, progress=not quiet, **options)
    check_request(request)  # a mistake that needs no model is reported before the libraries load
    _quiet_libraries()
    for record in run_generate(request):
        click.echo(json.dumps(record, ensure_ascii=False) if as_json else str(Path(out) / record["file"]))


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", default=None, type=click.Path(), help="Folder for the new image (default: beside it).")
@click.option("--model", "-m", default=None, help="Use this model instead of the recorded one.")
@click.option("--device", default=None)
@click.option("--check/--no-check", default=True, show_default=True, help="Compare pixels with the original.")
@click.option("--image", "input_image", multiple=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="An edited image's input, when it is no longer where the record says (its sha256 is checked); "
                   "repeatable, in the recorded order, for an instruction edit's several.")
@click.option("--mask", "input_mask", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Likewise for an inpainted image's mask.")
def replay(image, out, model, device, check, input_image, input_mask):
    """Regenerate IMAGE from the genkit record stored in it."""
    from genkit.run import replay_image

    _quiet_libraries()
    replay = replay_image(image, out=out, model=model, device=device, input_image=input_image, input_mask=input_mask)
    click.echo(str(replay.path))
    if check:
        click.echo(replay.summary(), err=True)


def _memory_amount(ctx, param, value):
    from genkit.memory import parse_bytes

    try:
        return None if value is None else parse_bytes(value)
    except GenkitError as exc:
        raise click.BadParameter(exc.message) from None


@main.command()
@click.option("--model", "-m", default=None,
              help="Plan this model's memory instead (preset, diffusers folder or hub id; its configs are enough).")
@click.option("--device", default=None, help="With --model: plan for cpu, cuda, cuda:N or mps (default: the best here).")
@click.option("--memory", default=None, metavar="AMOUNT", callback=_memory_amount,
              help="With --model: the budget, like 12GiB, 24GB or 512MiB (default: what is free on --device now).")
@click.option("--width", "-W", type=int, default=None)
@click.option("--height", "-H", type=int, default=None)
@click.option("--batch-size", "-b", default=1, show_default=True)
@click.option("--dtype", default=None, help="With --model: fp32, fp16 or bf16 (default: the family's on --device).")
@click.option("--json", "as_json", is_flag=True, help="With --model: the plan as one JSON object.")
def info(model, device, memory, width, height, batch_size, dtype, as_json):
    """Device, library versions, and each attention backend: whether its probe ran here, and why not.

    With --model: a memory plan instead, from the model's configs alone (no weights read): each component's bytes,
    dtype and placement, and the fastest placement that fits --memory with its predicted peak (estimates)."""
    if model is not None:
        from genkit import memory as memory_plan

        _quiet_libraries()
        plan = memory_plan.plan(model, device=device, memory=memory, width=width, height=height,
                                batch_size=batch_size, dtype=dtype)
        click.echo(json.dumps(plan.to_json()) if as_json else memory_plan.describe(plan))
        return
    if device or memory or width or height or batch_size != 1 or dtype or as_json:
        raise GenkitError("is needed with --device, --memory, --width, --height, --batch-size, --dtype and --json "
                          "(they plan a model's memory)", param="model")
    import platform

    import torch

    from genkit import attention, presets
    from genkit.generate import versions
    from genkit.loader import pick_device

    device = pick_device(None)
    lines = {"device": device, "python": platform.python_version(), **versions()}
    if device.startswith("cuda"):
        lines["gpu"] = torch.cuda.get_device_name(0)
    if device == "cpu":
        from genkit import cpu

        threads = cpu.choose_threads(exact=True)
        lines["cpu threads"] = f"{threads.count} ({threads.advice or threads.why})"
    else:
        lines["cpu threads"] = str(torch.get_num_threads())
    lines["bf16 on CPU"] = "yes" if "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags() else "no"
    for backend, state in attention.report(device).items():  # each backend's probe, run here
        lines[f"attention {backend}"] = state
    lines["presets"] = ", ".join(presets.names())
    lines["GENKIT_HOME"] = str(presets.genkit_home())
    width = max(map(len, lines))
    for key, value in lines.items():
        click.echo(f"{key:<{width}}  {value}")


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@main.command()
@click.option("--models-dir", default=None, metavar="DIR", envvar="GENKIT_MODELS_DIR",
              help="Also list the checkpoints and LoRAs in A1111's or ComfyUI's folder, with their detected family.")
@click.option("--allow-pickle", is_flag=True, help="Also read .ckpt pickle files' names (they can run code).")
def models(models_dir, allow_pickle):
    """List the pipeline presets (and the files of --models-dir)."""
    from genkit import presets, single_file

    click.echo(f"{'preset':<14} {'family':<13} source  description")
    for name in presets.names():
        preset = presets.get(name)
        click.echo(f"{name:<14} {preset.family_name:<13} {preset.source}  {preset.description}")
    root = single_file.models_dir(models_dir)
    if root is not None:
        click.echo(f"\n{'name':<30} {'family':<13} {'kind':<10} path")
        for row in single_file.listing(root, allow_pickle):
            family = row.get("family") or ("-" if row["kind"] == "lora" else "unknown")
            click.echo(f"{row['name']:<30} {family:<13} {row['kind']:<10} {row['path']}")


@main.group()
def train():
    """Train genkit-mini's decoder (base), a LoRA adapter (lora) or a ControlNet (controlnet)."""


@train.command("base")
@click.option("--config", "-c", default=DEFAULT_MODEL, show_default=True,  # the default model's shipped recipe
              help="Recipe TOML file, or the name of a shipped recipe (genkit-mini, genkit-mini-tiny).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. train.steps=100.")
@click.option("--out", "-o", default="runs/genkit-mini", show_default=True, type=click.Path())
@click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in --out.")
@click.option("--stop-at", type=int, default=None, help="Pause after this step and export its weights.")
@click.option("--quiet", "-q", is_flag=True)
def train_base_command(config, overrides, out, resume, stop_at, quiet):
    """Train genkit-mini's decoder from scratch on the shapes world."""
    from genkit.train.base import load_recipe, train_base

    _quiet_libraries()
    _one_line_warnings()
    folder = train_base(load_recipe(_recipe_path(config), overrides), out, resume=resume, progress=not quiet,
                        stop_at=stop_at)
    click.echo(str(folder))


@train.command("lora")
@click.argument("data_dir", type=click.Path())
@click.option("--model", "-m", envvar="GENKIT_MODEL", default=None,
              help="Base model: preset name, SD-family diffusers folder or hub id (env GENKIT_MODEL; default genkit-mini).")
@click.option("--out", "-o", default=None, type=click.Path(),
              help="Folder for the LoRA, its record and checkpoints (needed unless --dry-run).")
@click.option("--config", "-c", default=None,
              help="Recipe TOML file, or the name of a shipped recipe (lora-tiny), laid over the defaults "
                   "(configs/lora.toml: generic values and one table per model family).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. lora.rank=16.")
@click.option("--instance-prompt", default=None, help='Caption for images without one, e.g. "a photo of sks dog".')
@click.option("--trigger", "triggers", multiple=True, metavar="WORD",
              help="A word that names the new concept in the captions (repeatable); default: found in the captions "
                   "(a word in at least a quarter of them that the text encoder does not know). Prior images are "
                   "made from the captions without it.")
@click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in --out.")
@click.option("--memory", default=None, metavar="AMOUNT", callback=_memory_amount,
              help="Plan for this much GPU memory, like 24GiB (default: what is free on the GPU); on a CPU, plan its "
                   "RAM (default: printed, not applied).")
@click.option("--dry-run", is_flag=True,
              help="Print the memory plan and its predicted peak, and train nothing (any machine; the model's configs "
                   "are enough; --memory without a GPU here plans for a GPU of that size).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_lora_command(data_dir, model, out, config, overrides, instance_prompt, triggers, resume, memory, dry_run,
                       as_json, quiet):
    """Fine-tune a LoRA adapter on the images (and captions) in DATA_DIR; print the files written.

    With no --config the recipe is the base model's family's default (configs/lora.toml), prior
    preservation included: prior images (genkit-mini: scenes of its own world; other families: the base
    model's images of the captions without the trigger words) are made once into OUT/priors.

    The run's memory is planned first (the frozen base, adapters, gradients, optimizer states, caches, activations)
    and on CUDA the cheapest steps that fit are taken: gradient checkpointing, encoders off the GPU after caching,
    8-bit AdamW, an int8 or nf4 base, block swapping. --dry-run prints that plan and stops."""
    from genkit.train.lora import plan_memory, train_lora

    _quiet_libraries()
    _one_line_warnings()
    if triggers:
        overrides = (*overrides, "data.trigger_words=" + json.dumps(list(triggers)))
    recipe = _recipe_path(config) if config else None
    if dry_run:
        from genkit.memory.training import describe

        plan = plan_memory(data_dir, model=model, config=recipe, overrides=overrides, instance_prompt=instance_prompt,
                           memory=memory)
        click.echo(json.dumps(plan.to_json()) if as_json else describe(plan))
        return
    if as_json:
        raise GenkitError("--json goes with --dry-run (it prints the plan); training prints the files written")
    if out is None:
        raise GenkitError("is needed: the folder for the LoRA, its record and checkpoints", param="out")
    result = train_lora(data_dir, out, model=model, config=recipe, overrides=overrides, resume=resume,
                        instance_prompt=instance_prompt, progress=not quiet, memory=memory)
    if os.environ.get("RANK", "0") == "0":  # one process of a launch reports what was written
        click.echo(str(result.weights))
        click.echo(str(result.record))



@train.command("controlnet")
@click.argument("data_dir", type=click.Path())
@click.option("--model", "-m", envvar="GENKIT_MODEL", default=None,
              help="Base model: preset name, UNet-family diffusers folder or hub id (env GENKIT_MODEL; default "
                   "genkit-mini).")
@click.option("--out", "-o", required=True, type=click.Path(),
              help="Folder for the ControlNet (a diffusers folder: --control model=OUT loads it), its record and "
                   "checkpoints.")
@click.option("--config", "-c", default=None,
              help="Recipe TOML file, or the name of a shipped recipe, laid over the defaults (configs/controlnet.toml: "
                   "generic values and one table per model family).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. train.steps=500 or data.preprocessor=none.")
@click.option("--instance-prompt", default=None, help="Caption for images without one.")
@click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_controlnet_command(data_dir, model, out, config, overrides, instance_prompt, resume, quiet):
    """Train a ControlNet on the images (and captions) in DATA_DIR; print the files written.

    Each image's control map is its canny edge map (data.preprocessor=canny, the default), or photo.control.png
    beside photo.jpg (data.preprocessor=none). The base model stays frozen; the ControlNet starts as a copy of its
    UNet's encoder (diffusers' ControlNetModel.from_unet) with zero convolutions out."""
    from genkit.train.controlnet import train_controlnet

    _quiet_libraries()
    _one_line_warnings()
    result = train_controlnet(data_dir, out, model=model, config=_recipe_path(config) if config else None,
                              overrides=overrides, resume=resume, instance_prompt=instance_prompt, progress=not quiet)
    if os.environ.get("RANK", "0") == "0":  # one process of a launch reports what was written
        click.echo(str(result.weights))
        click.echo(str(result.record))

def _recipe_path(config: str) -> Path:
    """A path as given, else a recipe shipped in the package (configs/<name>.toml)."""
    from genkit.presets import packaged_dir

    path = Path(config)
    if path.is_file():
        return path
    shipped = packaged_dir("_configs", "configs").joinpath(f"{config.removesuffix('.toml')}.toml")
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".toml") for p in packaged_dir("_configs", "configs").iterdir()
                   if p.name.endswith(".toml"))
    raise GenkitError(f"{config!r} is neither a file nor a shipped recipe (shipped: {', '.join(names)})",
                      param="config")


@main.command("eval")
@model_options
@click.option("--seed", default=0, show_default=True, help="Seed of the prompt set.")
@click.option("--seen", default=200, show_default=True, help="Prompts with colour-shape pairs seen in training.")
@click.option("--held-out", default=100, show_default=True, help="Prompts with the held-out pairs.")
@click.option("--unseen-phrasing", default=100, show_default=True, help="Prompts in phrasings never trained on.")
@click.option("--two-object", default=200, show_default=True, help="Two-object prompts.")
@click.option("--steps", "num_inference_steps", type=int, default=None)
@click.option("--guidance", "guidance_scale", type=float, default=None)
@click.option("--scheduler", default=None, help=SCHEDULER_HELP)
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]")
@click.option("--batch-size", default=50, show_default=True)
@click.option("--out", "-o", default="eval", show_default=True, type=click.Path(), help="Folder for the grid and report.")
@click.option("--quiet", "-q", is_flag=True)
def eval_command(out, quiet, **options):
    """Judge how well a shapes model follows prompts; print the table, write a grid."""
    from genkit.run import run_eval

    _quiet_libraries()
    table, paths = run_eval(out=out, progress=not quiet, **options)
    click.echo(table)
    for path in paths:
        click.echo(str(path))


@main.group()
def data():
    """Inspect training data."""


@data.command("check")
@click.argument("data_dir", type=click.Path())
@click.option("--instance-prompt", default=None, help="Caption for images without one (DreamBooth style).")
@click.option("--model", "-m", envvar="GENKIT_MODEL", default=None,
              help="Count tokens with this model's tokenizer, and show the aspect-ratio buckets training on it uses "
                   "(default: the buckets of the default model, genkit-mini). No weights are read.")
@click.option("--config", "-c", default=None, help="The LoRA recipe whose [data] section places the images "
                                                   "(as `train lora --config`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. data.resolution=768 or data.buckets=false.")
def data_check(data_dir, instance_prompt, model, config, overrides):
    """Print what LoRA training would see in DATA_DIR: captions, masks, sizes, buckets."""
    from dataclasses import replace

    from genkit.data.imagefolder import check_dataset, format_report
    from genkit.train.data_check import bucket_spec, model_sides

    _quiet_libraries()
    _one_line_warnings()
    tokenizer = limit = None
    if model is not None:
        from genkit.loader import load_tokenizer

        tokenizer, limit = load_tokenizer(model)  # the tokenizer alone: no weights are read
    spec, note = None, ""
    try:
        sides = model_sides(model)  # its configs alone (genkit's own small format: loaded on the CPU)
    except GenkitError as exc:
        note = f"the model's size and side multiple could not be read: {exc}"
    else:
        spec = bucket_spec(config=_recipe_path(config) if config else None, overrides=overrides, sides=sides)
    report = check_dataset(data_dir, instance_prompt=instance_prompt, tokenizer=tokenizer, max_tokens=limit,
                           buckets=spec)
    click.echo(format_report(replace(report, bucket_note=note)))
    if not report.ok:
        sys.exit(2)


@main.group("lora")
def lora_group():
    """Inspect LoRA files (any layout), or export one in kohya's layout for A1111 and ComfyUI."""


@lora_group.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--model", "-m", default=None, help="Also count how many of its layers fit this model (preset, folder "
                                                  "or hub id), the check --lora makes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def lora_inspect(path, model, as_json):
    """Print what the LoRA at PATH (folder or .safetensors file) holds: format, ranks, alphas, target layers, base
    model, trigger words and training settings (genkit's record or kohya's ss_* fields)."""
    from genkit.lora.files import format_info, inspect_lora

    _quiet_libraries()
    info = inspect_lora(path, model=model)
    click.echo(json.dumps(info.as_dict(), indent=1) if as_json else format_info(info))


@lora_group.command("export")
@click.argument("src", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["kohya", "comfyui"]), default="kohya", show_default=True,
              help="kohya: one .safetensors file, lora_unet_... keys and ss_* metadata (A1111, ComfyUI, kohya); "
                   "comfyui: diffusion_model.<original layer> keys (transformer families, Z-Image's only layout).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="The file to write (.safetensors).")
@click.option("--model", "-m", default=None, help="Check that it fits this model first (default: trust the record).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def lora_export(src, fmt, out, model, overwrite):
    """Write the LoRA at SRC (a genkit/diffusers/peft folder or file) in another tool's layout; print the file."""
    from genkit.lora.files import export_kohya

    _quiet_libraries()
    result = export_kohya(src, out, model=model, overwrite=overwrite, layout=fmt)
    click.echo(str(result.path))
    click.echo(f"{result.layers} layers, rank {result.rank}, alpha {result.alpha:g}, ss_base_model_version "
               f"{result.base_version}, sshs_model_hash {result.sha256[:12]}", err=True)


from genkit.serve.command import serve as _serve  # noqa: E402 - click only; fastapi and torch load when it runs

main.add_command(_serve)

if __name__ == "__main__":
    main()
