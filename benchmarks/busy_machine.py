"""genkit-mini on an idle and on a busy machine: torch's default thread count against genkit's chosen one.

    python benchmarks/busy_machine.py [--images 16] [--steps 20] [--competitors 1]

OpenMP threads spin-wait for each other at the end of every parallel region; when another process holds a
core, a thread waiting for that core stalls all the others. genkit.cpu.choose_threads("auto") counts the
cores other processes keep busy (/proc/stat over a quarter second, while this process idles) and uses the
rest. This script times genkit-mini's images/s, in one process:

1. as found: torch's default thread count, then the chosen count (each row says how many cores other
   processes kept busy when it started; on an idle machine, 0);
2. busy: with `--competitors` more processes each spinning on a core (a Python busy loop), the same two.

Run it on an otherwise idle machine for the idle figures; it takes one to three minutes on 2 idle cores.

Measured (2-core AMD EPYC, genkit-mini, 8 images of 10 steps, batch 8), on a machine that other jobs kept
busy (load average 5.5-6.9 during the run; `busy_cores` said 1 of 2): torch's default 2 threads made
0.10 images/s, the chosen 1 thread 0.76 images/s (7.6x). The "busy" rows did not finish inside the
3 minutes the run was given, and no idle figure could be taken that day.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

import genkit
from genkit import cpu

PROMPTS = ["a red circle on the left", "a blue square above a yellow triangle", "a green triangle", "a purple star"]


def images_per_second(pipeline, threads: int, images: int, steps: int) -> float:
    torch.set_num_threads(threads)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images)]
    pipeline.generate(prompts[:2], seed=0, num_inference_steps=2, batch_size=2)  # warm the pool at this count
    start = time.perf_counter()
    pipeline.generate(prompts, seed=0, num_inference_steps=steps, batch_size=8)
    return images / (time.perf_counter() - start)


def measure(label: str, pipeline, default: int, images: int, steps: int) -> list[dict]:
    torch.set_num_threads(default)
    busy = cpu.busy_cores()
    chosen = cpu.choose_threads("auto")  # measured while this process idles, as genkit.load does
    print(f"{label}: other processes keep {busy:.1f} of {cpu.usable_cores()} cores busy, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = [{"machine": label, "threads": default, "how": "torch's default",
             "images_per_s": images_per_second(pipeline, default, images, steps)},
            {"machine": label, "threads": chosen.count, "how": chosen.why,
             "images_per_s": images_per_second(pipeline, chosen.count, images, steps)}]
    for row in rows:
        print(f"{row['machine']:<8} {row['threads']:>7}  {row['images_per_s']:>8.2f}  {row['how']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per timing (batches of 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (genkit-mini's default is 20)")
    parser.add_argument("--competitors", type=int, default=1, help="busy-looping processes in the busy rows")
    args = parser.parse_args()

    default = torch.get_num_threads()
    pipeline = genkit.load(None, device="cpu", threads=default)  # genkit-mini, the default model
    print(f"genkit-mini, {args.images} images of {args.steps} steps, batch 8; {cpu.usable_cores()} usable cores, "
          f"torch's default {default} threads")
    print(f"{'':<8} {'threads':>7}  {'images/s':>8}  chosen by")
    rows = measure("as found", pipeline, default, args.images, args.steps)
    competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.competitors)]
    try:
        time.sleep(1.0)  # let them take their cores
        rows += measure("busy", pipeline, default, args.images, args.steps)
    finally:
        for process in competitors:
            process.kill()
            process.wait()
    found_default, _, busy_default, busy_chosen = (row["images_per_s"] for row in rows)
    print(f"busy: the chosen count makes {busy_chosen / busy_default:.2f}x the images/s of the default "
          f"({busy_chosen / found_default:.2f}x of the default as found)")


if __name__ == "__main__":
    main()
