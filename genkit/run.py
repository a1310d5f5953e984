"""Whole runs as library calls: generate into a folder, replay an image, evaluate a shapes model.

The CLI is a thin layer over these; an application can call them the same way.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from genkit import distributed
from genkit.errors import GenkitError, term
from genkit.outputs import (ENVIRONMENT, RECORD_SETTINGS, OutputWriter, check_out_dir, read_record, recorded_seed,
                            run_key, save_png, save_text)


@dataclass
class GenerateRequest:
    """A `genkit generate` run: prompts, settings, model and where the images go."""

    prompts: list
    out: str | Path = "outputs"
    model: str | None = None
    num_images_per_prompt: int = 1
    batch_size: int = 8
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    prompt_syntax: str | None = None  # "a1111" (the default: weights read) or "plain" (genkit.prompt_syntax)
    hires_scale: float | None = None  # the hires fix (genkit.hires): scale, strength, steps, upscaler
    hires_strength: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None
    control: object = None  # ControlNet units (genkit.controlnet): Controls, "model=PATH,image=PATH,..." or dicts
    ip_adapter: object = None  # an IP-Adapter and its reference image (genkit.ipadapter): an IPAdapter or a dict
    image: object = None  # editing (genkit.edit): the input image, its mask, strength, outpaint sides
    mask: object = None
    strength: float | None = None
    outpaint: object = None
    attention: str = "auto"
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    loras: tuple = field(default_factory=tuple)
    quantize: object = None  # weight-only quantization as the model loads (genkit.quantize); a record's dict too
    base: str | None = None  # the pipeline folder a .gguf model file (a denoiser alone) comes with
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    memory: int | str | None = None  # the GPU memory to plan for (genkit.memory); None: what is free on it
    compile: bool = False
    exact: bool | None = None  # pixels independent of the batch (genkit.invariance); None: on the CPU only
    long_prompts: str | None = None  # "chunk" or "truncate" past CLIP's 75 tokens; None: the family's way
    overwrite: bool = False
    grid: bool = False
    progress: bool = True

    def config(self):
        """The request's settings (genkit.settings' `per_call` ones, which it holds under the same names)."""
        from genkit import settings
        from genkit.generate import GenerationConfig

        return GenerationConfig(**{name: getattr(self, name) for name in settings.names(per_call=True)})


def load_for(request, device: str | None = None) -> "object":
    """Load the request's model (and LoRAs: genkit.load checks them before the slow load) after the cheap checks
    have passed."""
    import genkit

    pipeline = genkit.load(request.model, device=device or request.device, dtype=request.dtype, attention=request.attention,
                           allow_pickle=request.allow_pickle, vae_slicing=getattr(request, "vae_slicing", False),
                           vae_tiling=getattr(request, "vae_tiling", False),
                           cpu_offload=getattr(request, "cpu_offload", False), exact=getattr(request, "exact", None),
                           memory=getattr(request, "memory", None),
                           lora=request.loras, quantize=getattr(request, "quantize", None),
                           base=getattr(request, "base", None))
    if getattr(request, "long_prompts", None):
        pipeline.set_long_prompts(request.long_prompts)
    if getattr(request, "compile", False):
        if getattr(request, "progress", False):
            print("genkit: --compile: the first batch compiles the UNet first (about 40 s on 2 CPU cores; once "
                  "more for a last, smaller batch)", file=sys.stderr)
        pipeline.compile()
    return pipeline


def run_generate(request: GenerateRequest, *, jobs=None, pipeline=None) -> Iterator[dict]:
    """Generate every missing image of the request into its folder; yield one record per image.

    Images already in the folder (same index, seed and prompt) are kept unless `overwrite`;
    `jobs` restricts the run to a share of the plan (one process of several).
    """
    check_request(request)  # before the slow model load
    processes = distributed.state()  # None unless under accelerate launch / torchrun
    if processes is not None and request.seed is None:
        raise GenkitError(f"must be given when several processes share a run (pass {term('seed')} N)", param="seed")
    pipeline = pipeline or load_for(request, device=str(processes.device) if processes else None)
    config, run_seed = request.config(), None
    if request.seed is None and jobs is None:  # a drawn seed is kept in the folder, so a rerun finishes the run
        key = run_key(request)
        seed = recorded_seed(request.out, key)
        if seed is None:
            seed = secrets.randbelow(2**31)
            run_seed = (key, seed)
        else:
            print(f"genkit: finishing the run in {request.out} with its recorded base seed {seed} (pass --seed to "
                  "start another)", file=sys.stderr)
        config = replace(config, seed=seed)
    all_jobs = pipeline.plan(request.prompts, config) if jobs is None else jobs
    jobs = distributed.share(all_jobs, processes)
    writer = OutputWriter(request.out, overwrite=request.overwrite, run_seed=run_seed)
    kept = [pipeline.record(job) for job in jobs if writer.has(job.index, job.seed, job.prompt)]
    kept_indices = {record["index"] for record in kept}
    todo = [job for job in jobs if job.index not in kept_indices]
    main_process = processes is None or processes.is_main_process
    try:
        yield from _write_behind(writer, pipeline.iter_generate(request.prompts, config, jobs=todo,
                                                                progress=request.progress and main_process))
    finally:
        if processes is not None:
            processes.wait_for_everyone()  # every share written before the manifest is merged
        if main_process:
            writer.close()
    for record in kept:
        yield {**record, "file": writer.path_for(record).name, "skipped": True}
    if request.grid and all_jobs and main_process:
        _write_grid(writer, all_jobs, pipeline)


def check_request(request: GenerateRequest) -> None:
    """Everything about a request that needs no model: the output folder, the numbers, the edit's inputs."""
    check_out_dir(request.out)
    _check_numbers(request)
    _check_edit_inputs(request)
    if request.ip_adapter is not None:  # its files found and its image read (genkit.ipadapter)
        from genkit import ipadapter

        ipadapter.parse(request.ip_adapter)


def _check_numbers(request: GenerateRequest) -> None:
    """The settings a model is not needed to judge, checked before it loads (the plan checks them again)."""
    from genkit import checks

    checks.check_count(request.num_images_per_prompt, "num_images_per_prompt")
    checks.check_count(request.batch_size, "batch_size")
    if request.num_inference_steps is not None:
        checks.check_steps(request.num_inference_steps)
    if request.guidance_scale is not None:
        checks.check_guidance(request.guidance_scale)
    if request.seed is not None:
        checks.check_seed(request.seed)
    for side in ("width", "height"):
        if getattr(request, side) is not None:
            checks.check_side(getattr(request, side), side)
    _check_reading(request)


def _check_reading(request: GenerateRequest) -> None:
    """The prompt syntax and the hires fix's values (the plan checks them again, with the model)."""
    from genkit import hires, prompt_syntax

    prompt_syntax.check_syntax(request.prompt_syntax)
    if request.hires_scale is not None:
        hires.check_scale(request.hires_scale)
    if request.hires_strength is not None:
        hires.check_strength(request.hires_strength)
    if request.hires_steps is not None:
        hires.check_steps(request.hires_steps)
    if request.hires_upscaler is not None:
        hires.check_upscaler(request.hires_upscaler)


def _check_edit_inputs(request: GenerateRequest) -> None:
    """The edit's inputs read and checked before the slow model load (the plan checks them again, with the model)."""
    from genkit import edit

    if request.strength is not None:
        edit.check_strength(request.strength)
    if request.outpaint is not None:
        edit.parse_outpaint(request.outpaint)
    if request.image is None:
        return
    image = edit.picture(request.image, "image")  # several: an instruction edit's (the plan says if the model reads them)
    if request.mask is not None and request.outpaint is None and isinstance(image, edit.Picture):
        edit.check_mask(edit.picture(request.mask, "mask"), image.pixels.size)


def _write_behind(writer: OutputWriter, results) -> Iterator[dict]:
    """Write each batch's PNGs on a second thread while the next batch is computed; yield records once written.

    PNG encoding and the record's text chunks take the denoising thread's time otherwise (zlib and
    Pillow release the GIL). One writer thread, so files and manifest lines appear in order.
    """
    from concurrent.futures import ThreadPoolExecutor

    def write(batch) -> list[dict]:
        return [{**record, "file": writer.write(image, record).name} for image, record in batch]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="genkit-writer") as pool:
        pending = None
        for result in results:
            submitted = pool.submit(write, list(zip(result.images, result.metadata)))
            if pending is not None:
                yield from pending.result()  # the previous batch: written while this one was computed
            pending = submitted
        if pending is not None:
            yield from pending.result()


def _write_grid(writer: OutputWriter, jobs, pipeline) -> Path:
    from PIL import Image

    from genkit.grid import make_grid

    images, labels = [], []
    for job in jobs:
        with Image.open(writer.path_for(pipeline.record(job))) as image:
            images.append(image.convert("RGB"))
        labels.append(f"{job.prompt} ({job.seed})")
    grid = make_grid(images, labels)
    path = writer.out / "grid.png"
    save_png(grid, path)
    return path


@dataclass
class Replay:
    """What `genkit replay` found: the new image, whether every pixel matches, and if not by how much and why.

    Unpacks as `(path, identical)`."""

    path: Path
    identical: bool
    largest_difference: int = 0  # in levels of 255
    reasons: list[str] = field(default_factory=list)  # recorded settings that differ from this run's

    def __iter__(self):
        return iter((self.path, self.identical))

    def summary(self) -> str:
        if self.identical:
            return "identical to the original"
        why = "; ".join(self.reasons) or "no recorded setting differs (another CPU kind or library build sums " \
                                          "in another order)"
        return f"differs from the original by up to {self.largest_difference} of 255 ({why})"


def _exact_offered(device: str | None) -> bool:
    """A recorded --exact replays as --exact where it is offered; on CUDA as --fast (genkit.loader.exact_refusal)."""
    from genkit.loader import exact_refusal, pick_device

    return exact_refusal(pick_device(device)) is None


def replay_image(image: str | Path, *, out=None, model=None, device=None, input_image=None, input_mask=None
                 ) -> Replay:
    """Regenerate an image from its stored record; say whether pixels match, and if not, what differs.

    An edited image's input (and mask) is read again from the recorded path, else beside `image`, or from
    `input_image` / `input_mask` when given, and must have the recorded sha256."""
    import numpy as np
    from PIL import Image

    from genkit import settings
    from genkit.generate import Job

    record = read_record(image)
    out_dir = check_out_dir(out or Path(image).parent)
    given = {"image": input_image, "mask": input_mask}
    inputs = {key: _find_input(record, key, given[key], Path(image).parent)
              for key in settings.names(digest=True) if record.get(key) is not None}
    request = GenerateRequest(prompts=[record["prompt"]], model=model or record["model"], device=device,
                              attention="auto", loras=tuple(f"{lo['path']}:{lo['scale']}" for lo in record["lora"]),
                              dtype=record.get("dtype"), exact=record.get("exact", True) and _exact_offered(device),
                              long_prompts=_long_prompts(record), quantize=record.get("quantization"))
    from genkit import cpu

    if isinstance(record.get("threads"), int) and 1 <= record["threads"] <= cpu.usable_cores():  # pixels depend on it
        cpu.choose_threads(record["threads"])  # GENKIT_THREADS / --threads still win inside genkit.load
    pipeline = load_for(request)
    # the recorded settings are the image's Job (its inputs read again); the rest is what to load and how
    recorded = {key: record[key] for key in RECORD_SETTINGS if key in record and key not in inputs}
    if recorded.get("control"):  # each control image read again and checked, as the inputs (genkit.controlnet)
        from genkit import controlnet

        recorded["control"] = controlnet.from_record(recorded["control"], Path(image).parent)
    if recorded.get("ip_adapter"):  # its reference image read again and checked, and the adapter's digests
        from genkit import ipadapter

        recorded["ip_adapter"] = ipadapter.from_record(recorded["ip_adapter"], Path(image).parent)
    job = Job(index=record["index"], **recorded, **inputs)
    result = pipeline.generate([record["prompt"]], jobs=[job])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"replay-{Path(image).name}"
    now = pipeline.record(job)
    save_png(result.images[0], path, now)
    with Image.open(image) as original:
        before = np.asarray(original.convert("RGB")).astype(int)
    after = np.asarray(result.images[0]).astype(int)
    if before.shape != after.shape:
        return Replay(path, False, 255, [f"size {before.shape[1]}x{before.shape[0]} -> {after.shape[1]}x{after.shape[0]}"])
    largest = int(np.abs(before - after).max())
    reasons = [f"{label} {record.get(key)} -> {now.get(key)}" for key, label in ENVIRONMENT.items()
               if key in record and record.get(key) != now.get(key)]
    return Replay(path, largest == 0, largest, reasons)


def _long_prompts(record: dict) -> str | None:
    """How the recorded prompt was read: in chunks, cut (by a CLIP family's "truncate"), or as its family reads it."""
    if "prompt_chunks" in record:
        return "chunk"
    from genkit import families

    family = record.get("family")
    if "prompt_truncated" in record and family in families.names() and "chunk" in families.get(family).long_prompts:
        return "truncate"  # a CLIP family's cut at 77 (or an image made before chunks)
    return None


def _find_input(record: dict, key: str, given, beside: Path):
    """The recorded input `key` ("image" or "mask") as a genkit.edit.Picture, checked against its sha256; a recorded
    list (an instruction edit's input images) as genkit.edit.Pictures, `given` then a list of paths in its order."""
    from genkit import edit

    if isinstance(record[key], list):
        given = list(given) if isinstance(given, (list, tuple)) else [given] * (given is not None)
        if given and len(given) != len(record[key]):
            raise GenkitError(f"this image was made from {len(record[key])} input images; pass each with --image PATH, "
                              "in the recorded order")
        return edit.Pictures(tuple(_find_input({key: one, f"{key}_sha256": want}, key, given[n] if given else None,
                                               beside)
                                   for n, (one, want) in enumerate(zip(record[key], record[f"{key}_sha256"]))))
    if isinstance(given, (list, tuple)):  # replay's --image, repeatable for a list
        given = given[0] if len(given) == 1 else None if not given else given
        if isinstance(given, (list, tuple)):
            raise GenkitError(f"this image was made from one input image; pass one --image PATH, not {len(given)}")
    recorded, want = record[key], record.get(f"{key}_sha256")
    flag = "--image" if key == "image" else "--mask"
    if given is not None:
        candidates = [given]
    else:
        candidates = [] if recorded.startswith("<") else [recorded, str(beside / Path(recorded).name)]
        candidates = [c for c in dict.fromkeys(candidates) if Path(c).is_file()]
        if not candidates:
            where = "was given in memory" if recorded.startswith("<") else f"was read from {recorded}, not found"
            raise GenkitError(f"this image was made from an input {key} that {where}; pass it with {flag} PATH")
    for candidate in candidates:
        found = edit.picture(candidate, key)
        if found.sha256 == want or (recorded.startswith("<") and _pixels_sha256(candidate) == want):
            return found  # an in-memory input's record hashes its pixels: a file saved from it has the same
    raise GenkitError(f"input {key} {candidates[-1]} is not the one this image was made from (sha256 "
                      f"{found.sha256[:12]}..., recorded {str(want)[:12]}...); pass the original with {flag} PATH")


def _pixels_sha256(path) -> str:
    """genkit.images.sha256_of of the image in a file, as if it had been passed in memory (decoded, not its bytes)."""
    from PIL import Image

    from genkit import images

    try:
        with Image.open(path) as image:
            image.load()
            return images.sha256_of(image)
    except OSError:
        return ""


def run_eval(*, out="eval", model=None, seed=0, seen=200, held_out=100, unseen_phrasing=100, two_object=200,
             num_inference_steps=None, guidance_scale=None, scheduler=None, loras=(), batch_size=50,
             attention="auto", device=None, dtype=None, allow_pickle=False, progress=True) -> tuple[str, list[Path]]:
    """Generate the shapes prompt set with a model, judge every image, write the grid and report."""
    import json

    from genkit.eval.prompts import build_prompts
    from genkit.eval.report import evaluate, format_table, save_grid
    from genkit.generate import GenerationConfig
    from genkit.prompts import PromptSpec

    out = check_out_dir(out)
    request = GenerateRequest(prompts=[], model=model, attention=attention, device=device, dtype=dtype,
                              allow_pickle=allow_pickle, loras=tuple(loras))
    pipeline = load_for(request)
    items = build_prompts(seed, seen=seen, held_out=held_out, unseen_phrasing=unseen_phrasing, two_object=two_object)
    config = GenerationConfig(batch_size=batch_size, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, scheduler=scheduler)

    def generate_fn(prompts, seeds):
        specs = [PromptSpec(p, seed=s) for p, s in zip(prompts, seeds)]
        return pipeline.generate(specs, config).images

    if not items:
        raise GenkitError(f"the prompt set is empty (give at least one of {term('seen')}, {term('held_out')}, ...)")
    result = evaluate(generate_fn, items, batch_size=batch_size, progress=progress)
    table = format_table(result)
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(result, out / "grid.png")
    settings = pipeline.settings(config)
    report = out / "report.json"
    kept = ("model", "num_inference_steps", "guidance_scale", "scheduler", "width", "height", "lora", "dtype")
    save_text(report, json.dumps({"settings": {k: settings[k] for k in kept}, "seed": seed, **result.as_dict()},
                                 indent=1))
    save_text(out / "table.txt", table + "\n")
    return table, [grid, report]
