"""Images per second with 1 and 2 processes on the tiny SD model, from one run.

    python benchmarks/scale.py [--images 32] [--steps 10]

Both runs go through the same command line (`genkit generate`, the second with `--processes 2`),
each process with cores/processes threads, so the figure includes process start and model load.
On a 2-core machine expect little gain: it is for the record, not a target.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(model: Path, out: Path, images: int, steps: int, processes: int) -> float:
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "genkit", "generate", *[f"a red circle {i}" for i in range(images)], "--seed", "0",
               "--steps", str(steps), "--batch-size", "4", "--model", str(model), "--out", str(out), "--quiet"]
    if processes > 1:
        command += ["--processes", str(processes)]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    assert len(list(out.glob("*.png"))) == images
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from genkit.testing import build_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd(Path(tmp) / "tiny-sd")
        one = run(model, Path(tmp) / "one", args.images, args.steps, 1)
        two = run(model, Path(tmp) / "two", args.images, args.steps, 2)
    print(f"{args.images} images, {args.steps} steps, 64x64, tiny SD, {os.cpu_count()} CPU cores")
    print(f"  1 process   {one:6.2f} images/s")
    print(f"  2 processes {two:6.2f} images/s   ratio {two / one:.2f}x")


if __name__ == "__main__":
    main()
