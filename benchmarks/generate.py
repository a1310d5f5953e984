"""genkit's generation engine against a plain diffusers loop, and peak memory per attention backend.

    python benchmarks/generate.py [--images 32] [--steps 10] [--batch-size 8] [--size 512]

Everything runs on the tiny random-weight SD model of the tests, built fresh in a temporary
folder, so the figures compare engines, not models. Ratios are against a baseline measured in
the same run. Peak memory: each backend runs in its own process (CPU: peak resident memory
above the loaded model; CUDA: torch's peak allocation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompts(n: int) -> list[str]:
    return [f"a red circle number {i}" for i in range(n)]


def time_genkit(folder: Path, args, exact: bool = True) -> float:
    import genkit

    pipe = genkit.load(str(folder), device=args.device, exact=exact)
    pipe.generate(prompts(2), num_inference_steps=2, seed=0, batch_size=2)  # warm-up
    start = time.perf_counter()
    pipe.generate(prompts(args.images), num_inference_steps=args.steps, seed=0, batch_size=args.batch_size)
    return args.images / (time.perf_counter() - start)


def time_diffusers(folder: Path, args) -> float:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompts(2), num_inference_steps=2)  # warm-up
    start = time.perf_counter()
    texts = prompts(args.images)
    for i in range(0, len(texts), args.batch_size):
        batch = texts[i:i + args.batch_size]
        generators = [torch.Generator().manual_seed(i + k) for k in range(len(batch))]
        pipe(batch, num_inference_steps=args.steps, generator=generators, guidance_scale=7.0)
    return args.images / (time.perf_counter() - start)


def memory_probe(folder: Path, backend: str, size: int, device: str) -> dict:
    """Run in a child process: peak memory of one image at `size` with `backend`."""
    import torch

    import genkit

    pipe = genkit.load(str(folder), device=device, attention=backend)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    pipe.generate(["a red circle"], num_inference_steps=2, seed=0, width=size, height=size)
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"backend": backend, "peak_mib": round(peak, 1), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", nargs=2, metavar=("FOLDER", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(Path(args.probe[0]), args.probe[1], args.size, args.device)))
        return

    from genkit.testing import build_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_sd(Path(tmp) / "tiny-sd")
        import torch

        theirs = time_diffusers(folder, args)
        from genkit.loader import exact_refusal

        offered = exact_refusal(args.device) is None  # CUDA: --exact is refused, --fast is all there is
        exact, fast = time_genkit(folder, args) if offered else None, time_genkit(folder, args, exact=False)
        again = time_diffusers(folder, args)  # the baseline twice, around genkit's runs: the machine may drift
        theirs = max(theirs, again)
        print(f"throughput, {args.images} images, {args.steps} steps, batch {args.batch_size}, 64x64, {args.device}, "
              f"{torch.get_num_threads()} threads")
        print(f"  plain diffusers loop  {theirs:7.2f} images/s   (best of two runs: {min(theirs, again):.2f}, "
              f"{theirs:.2f})")
        if exact is not None:
            print(f"  genkit --exact        {exact:7.2f} images/s   ratio {exact / theirs:.2f}x  (the default)")
        print(f"  genkit --fast         {fast:7.2f} images/s   ratio {fast / theirs:.2f}x")
        print(f"peak memory for one {args.size}x{args.size} image by attention backend ({args.device})")
        backends = ["sdpa", "sliced", "math"] + (["xformers"] if args.device.startswith("cuda") else [])
        results = []
        for backend in backends:
            out = subprocess.run([sys.executable, __file__, "--probe", str(folder), backend, "--size", str(args.size),
                                  "--device", args.device], capture_output=True, text=True)
            if out.returncode:
                print(f"  {backend:<9} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        base = next((r for r in results if r["backend"] == "math"), results[0])
        for r in results:
            ratio = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] else float("nan")
            print(f"  {r['backend']:<9} {r['peak_mib']:8.1f} MiB  ({ratio:.2f}x math)  {r['seconds']:6.2f} s")


if __name__ == "__main__":
    main()
