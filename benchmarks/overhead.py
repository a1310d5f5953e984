"""Where genkit's time goes around the denoiser, per image, against a plain diffusers loop in the same run.

    python benchmarks/overhead.py [--family sd] [--images 16] [--steps 1] [--rounds 3] [--profile]

One image at a time (batch 1), each with its own prompt and seed, on a tiny random-weight model of
genkit.testing at 1 step, so what surrounds the denoiser is most of the time. Four ways of making
the same images, interleaved round by round (the median round is printed):

- plain: a diffusers pipeline called once per image with a CPU generator, as a user writes it;
- library: `Pipeline.generate` per image (`--fast`; the default on GPUs);
- CLI: `genkit.run.run_generate` per image (PNGs, records and manifest, written behind the next batch);
- served: A1111's txt2img through `genkit.serve`'s app on a localhost port, one request at a time.

Then each part of what genkit adds, timed alone per image on the same images: planning, the fresh
scheduler, the generators, the record (with its tokenizer calls), PNG encoding and its file, the
manifest line, base64, the queue's hand-off and the HTTP round trip. Every figure is also a
ratio against the plain loop's time per image. `--profile` adds cProfile's view of the library
loop against the plain loop's: the functions whose own time per image grew most.

benchmarks/gpu.py runs `measure` on a real-width model on a GPU (its `overhead` section).
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Settings:
    """One image's settings, the same for every way of making it."""

    steps: int
    width: int
    height: int
    guidance: float
    call_args: dict = field(default_factory=dict)  # the family's extra pipeline arguments (genkit.testing.CALL_ARGS)


def prompts(count: int, start: int = 0) -> list[str]:
    """Distinct prompts: the records' tokenizer calls and every cache see a new prompt per image, as a server does."""
    return [f"a photo of a red circle number {start + k}" for k in range(count)]


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- the four ways, each seconds per image ----------------------------------------------------------

def plain_loop(pipe, texts: list[str], settings: Settings, device: str) -> float:
    import torch

    sync(device)
    start = time.perf_counter()
    for k, text in enumerate(texts):
        pipe(text, num_inference_steps=settings.steps, guidance_scale=settings.guidance, width=settings.width,
             height=settings.height, generator=torch.Generator("cpu").manual_seed(k), **settings.call_args)
    sync(device)
    return (time.perf_counter() - start) / len(texts)


def library_loop(pipeline, texts: list[str], settings: Settings) -> float:
    sync(pipeline.device)
    start = time.perf_counter()
    for k, text in enumerate(texts):
        pipeline.generate([text], seed=k, batch_size=1, **_config(settings))
    sync(pipeline.device)
    return (time.perf_counter() - start) / len(texts)


def cli_loop(pipeline, texts: list[str], settings: Settings, out: Path) -> float:
    from genkit.prompts import PromptSpec
    from genkit.run import GenerateRequest, run_generate

    specs = [PromptSpec(text, seed=k) for k, text in enumerate(texts)]
    request = GenerateRequest(prompts=specs, out=out, batch_size=1, progress=False, overwrite=True,
                              **_config(settings))
    start = time.perf_counter()
    for _ in run_generate(request, pipeline=pipeline):
        pass
    return (time.perf_counter() - start) / len(texts)


def served_loop(client, texts: list[str], settings: Settings) -> float:
    start = time.perf_counter()
    for k, text in enumerate(texts):
        response = client.post("/sdapi/v1/txt2img", json=a1111_body(text, k, settings))
        response.raise_for_status()
        base64.b64decode(response.json()["images"][0])
    return (time.perf_counter() - start) / len(texts)


def a1111_body(text: str, seed: int, settings: Settings) -> dict:
    return {"prompt": text, "seed": seed, "steps": settings.steps, "cfg_scale": settings.guidance,
            "width": settings.width, "height": settings.height, "sampler_name": "default"}


def _config(settings: Settings) -> dict:
    return dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance, width=settings.width,
                height=settings.height, scheduler="default")


# -- what genkit adds, part by part -----------------------------------------------------------------

def per_call(function, count: int) -> float:
    """Median seconds of one call of `function(k)` over `count` calls (after one warm-up)."""
    function(-1)
    times = []
    for k in range(count):
        start = time.perf_counter()
        function(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_parts(pipeline, settings: Settings, count: int) -> dict[str, float]:
    """Seconds per image of each step `Pipeline.generate` adds around the diffusers call (batch 1, a new prompt)."""
    import torch

    from genkit.generate import GenerationConfig, _accepted, versions

    config = GenerationConfig(seed=1, batch_size=1, **_config(settings))
    job = pipeline.plan(["a photo"], config)[0]
    stamp = time.perf_counter_ns()

    def fresh(k):  # a prompt no cache has seen
        return f"a photo of a blue square {stamp} {k}"

    from genkit import schedulers

    named = schedulers.parse("dpm++", flow=pipeline.family.flow).value  # a sampler by name: schedulers.build
    generators = [torch.Generator("cpu")]
    args = pipeline.family.call_args([job], generators, lambda *a: a[-1])
    return {
        "plan (checks, jobs)": per_call(lambda k: pipeline.plan([fresh(k)], config), count),
        "fresh scheduler (default: the model's own)": per_call(lambda k: pipeline._scheduler("default"), count),
        f"fresh scheduler ({named})": per_call(lambda k: pipeline._scheduler(named), count),
        "generator per image": per_call(lambda k: torch.Generator("cpu").manual_seed(k), count),
        "record (a new prompt)": per_call(lambda k: pipeline.record(replace(job, prompt=fresh(k) + " r")), count),
        "  of it: prompt_cut": per_call(lambda k: pipeline.prompt_cut(fresh(k) + " c"), count),
        "  of it: chunks_of": per_call(lambda k: pipeline.chunks_of(replace(job, prompt=fresh(k) + " h")), count),
        "  of it: dtype": per_call(lambda k: pipeline.dtype, count),
        "  of it: versions()": per_call(lambda k: versions(), count),
        "_accepted's inspect (edits only)": per_call(lambda k: _accepted(pipeline.pipe, args), count),
    }


def file_parts(image, record: dict, folder: Path, count: int) -> dict[str, float]:
    """Seconds per image of writing it as the CLI and the server do, and of answering with it."""
    from genkit.outputs import MANIFEST, OutputWriter, infotext, save_png

    import json

    folder.mkdir(parents=True, exist_ok=True)
    writer = OutputWriter(folder)

    def encode(k):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer

    def manifest(k):
        with open(folder / MANIFEST, "a") as handle:
            handle.write(json.dumps({**record, "file": "x.png"}, ensure_ascii=False) + "\n")

    save_png(image, folder / "probe.png", record)
    data = (folder / "probe.png").read_bytes()
    return {
        "PNG: save_png (encode, chunks, file)": per_call(lambda k: save_png(image, folder / "probe.png", record), count),
        "  of it: PIL's encode alone": per_call(encode, count),
        "  of it: infotext": per_call(lambda k: infotext(record), count),
        "manifest line": per_call(manifest, count),
        "OutputWriter.write (all of the above)": per_call(
            lambda k: writer.write(image, {**record, "index": 10**6 + k + 1}), count),
        "read back + base64 (A1111's answer)": per_call(
            lambda k: base64.b64encode((folder / "probe.png").read_bytes()).decode(), count),
        "  bytes of the PNG": float(len(data)),
    }


def queue_handoff(count: int, gather: float) -> float:
    """Seconds from `submit` to the ticket's result through the server's Coalescer, with a batch that does nothing."""
    from genkit.serve.queue import Coalescer, Ticket

    queue = Coalescer(lambda key, jobs, check: [None] * len(jobs), gather=gather)
    queue.start()
    try:
        def once(k):
            queue.submit(Ticket(key=0, jobs=[k])).future.result(10)

        return per_call(once, count)
    finally:
        queue.stop()


def http_round_trip(client, count: int) -> float:
    """A GET that touches no model: uvicorn, FastAPI and httpx alone."""
    return per_call(lambda k: client.get("/sdapi/v1/options").raise_for_status(), count)


# -- one measurement --------------------------------------------------------------------------------

@dataclass
class Result:
    ways: dict[str, float]  # seconds per image: plain, library, CLI, served (the median round)
    rounds: dict[str, list[float]]
    parts: dict[str, float]
    profile: list[tuple[str, float]] = field(default_factory=list)
    gather: float = 0.0


def measure(folder: Path, *, device: str, dtype: str | None, settings: Settings, images: int, rounds: int,
            profile: bool = False, serve: bool = True, work: Path | None = None) -> Result:
    """Make `images` images one at a time in each of the four ways, `rounds` times interleaved, then time the parts."""
    import torch
    from diffusers import DiffusionPipeline

    import genkit

    work = Path(work or tempfile.mkdtemp(prefix="genkit-overhead-"))
    pipeline = genkit.load(str(folder), device=device, dtype=dtype, exact=False, attention="sdpa")
    plain = DiffusionPipeline.from_pretrained(folder, torch_dtype=pipeline.dtype).to(device)
    plain.set_progress_bar_config(disable=True)
    server = client = None
    if serve:
        server, client = start_server(pipeline, work / "served")
    try:
        texts = prompts(images)
        warm = prompts(2, start=10**6)
        plain_loop(plain, warm, settings, device)
        library_loop(pipeline, warm, settings)
        ways = {"plain diffusers loop": lambda: plain_loop(plain, texts, settings, device),
                "genkit library (--fast)": lambda: library_loop(pipeline, texts, settings),
                "genkit CLI path (files)": lambda: cli_loop(pipeline, texts, settings, work / "cli")}
        if client is not None:
            served_loop(client, warm, settings)
            ways["genkit served (A1111)"] = lambda: served_loop(client, texts, settings)
        times = {name: [] for name in ways}
        for _ in range(rounds):
            for name, run in ways.items():
                times[name].append(run())
        image_result = pipeline.generate(texts[:1], seed=0, batch_size=1, **_config(settings))
        count = max(20, images)
        parts = engine_parts(pipeline, settings, count)
        parts.update(file_parts(image_result.images[0], image_result.metadata[0], work / "files", max(5, count // 4)))
        parts["queue hand-off (its gather wait included)"] = queue_handoff(count, GATHER)
        if client is not None:
            parts["HTTP round trip (GET, no model)"] = http_round_trip(client, count)
        profiled = profile_library(plain, pipeline, prompts(images, start=2 * 10**6), settings) if profile else []
    finally:
        if server is not None:
            server.stop()
        plain = None  # its memory back (its modules are its own)
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return Result({name: statistics.median(values) for name, values in times.items()}, times, parts, profiled,
                  GATHER)


GATHER = 0.01  # genkit.serve's create_app default: the worker waits this long for requests sent together


def start_server(pipeline, out: Path):
    import httpx

    from genkit.serve import create_app
    from genkit.serve.runner import Background

    background = Background(create_app([pipeline], out=out, gather=GATHER))
    url = background.start()
    client = httpx.Client(base_url=url, timeout=600)

    class Server:
        def stop(self):
            client.close()
            background.stop()

    return Server(), client


def profile_library(plain, pipeline, texts: list[str], settings: Settings) -> list[tuple[str, float]]:
    """cProfile of the plain loop and of the library loop on the same prompts: the functions whose own time per image
    grew most in genkit's (on a GPU, a wait for the device is the own time of whatever synchronised)."""

    def own_times(run) -> dict[str, float]:
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        profiler.disable()
        times: dict[str, float] = {}
        for (file, line, name), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
            key = f"{Path(file).name}:{line}:{name}" if line else name
            times[key] = times.get(key, 0.0) + own / len(texts)
        return times

    theirs = own_times(lambda: plain_loop(plain, texts, settings, pipeline.device))
    mine = own_times(lambda: library_loop(pipeline, texts, settings))
    grown = [(key, seconds - theirs.get(key, 0.0)) for key, seconds in mine.items()]
    return sorted(grown, key=lambda row: -row[1])[:12]


# -- the table ----------------------------------------------------------------------------------------

def report(result: Result, title: str) -> None:
    plain = result.ways["plain diffusers loop"]
    library = result.ways["genkit library (--fast)"]
    print(title)
    print(f"  {'one image at a time':<42}{'ms/image':>10}{'rate vs plain':>15}   rounds (ms)")
    for name, seconds in result.ways.items():
        rounds = ", ".join(f"{1000 * s:.1f}" for s in result.rounds[name])
        print(f"  {name:<42}{1000 * seconds:>10.2f}{plain / seconds:>14.2f}x   {rounds}")
    print(f"  genkit's overhead per image: library {1000 * (library - plain):+.2f} ms, CLI "
          f"{1000 * (result.ways['genkit CLI path (files)'] - plain):+.2f} ms")
    if "genkit served (A1111)" in result.ways:
        served = result.ways["genkit served (A1111)"]
        print(f"  served vs library, one at a time: {library / served:.2f}x (target >= 0.9x), "
              f"{1000 * (served - library):+.2f} ms per request")
    print(f"  {'each part alone':<42}{'ms/image':>10}{'of plain':>15}")
    for name, seconds in result.parts.items():
        if name.startswith("  bytes"):
            print(f"  {name:<42}{seconds / 1024:>10.0f} KiB")
            continue
        print(f"  {name:<42}{1000 * seconds:>10.3f}{100 * seconds / plain:>14.1f}%")
    if result.profile:
        print("  cProfile, library loop minus plain loop: own ms per image that grew most (profiled, so inflated)")
        for name, seconds in result.profile:
            print(f"    {name[-60:]:<60}{1000 * seconds:>+9.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd", help="a genkit.testing family (default sd)")
    parser.add_argument("--images", type=int, default=16, help="images per way and round")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="add cProfile's view of the library loop")
    parser.add_argument("--no-serve", action="store_true", help="leave out the served way (no fastapi/uvicorn)")
    args = parser.parse_args(argv)
    import torch

    from genkit import testing

    quiet_libraries()
    torch.set_num_threads(args.threads)
    height, width = testing.FAMILIES[args.family].size
    with tempfile.TemporaryDirectory() as tmp:
        folder = testing.build_tiny(args.family, Path(tmp) / args.family)
        import genkit

        guidance = genkit.load(str(folder), device=args.device).defaults["guidance_scale"]
        settings = Settings(args.steps, width, height, guidance, dict(testing.CALL_ARGS.get(args.family, {})))
        result = measure(folder, device=args.device, dtype=None, settings=settings, images=args.images,
                         rounds=args.rounds, profile=args.profile, serve=not args.no_serve, work=Path(tmp) / "work")
    report(result, f"overhead: tiny {args.family}, {width}x{height}, {args.steps} step(s), guidance {guidance}, "
                   f"{args.images} images x {args.rounds} rounds, {args.device}, {torch.get_num_threads()} thread(s), "
                   f"{time.strftime('%Y-%m-%d')}")


def quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("genkit.serve").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    main()
