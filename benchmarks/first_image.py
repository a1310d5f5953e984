"""Time to the first PNG on disk, from the model being loaded, for a short and a very long run (issue #16).

    python benchmarks/first_image.py [--images 100000] [--short 8]

Both runs go through `genkit.run.run_generate` (what `genkit generate` calls) on one loaded genkit-mini, at
its default settings and batch size 8; a thread watches the output folder for the first PNG. The long run is
stopped after its first image. A long run starts with a batch of one (`genkit.generate.LONG_RUN`), so its
first image costs about one image's time; planning its jobs and records must not grow with its length.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def first_png(pipeline, images: int, folder: Path) -> float:
    from genkit.run import GenerateRequest, run_generate

    found, seen = threading.Event(), []

    def watch():
        while not found.is_set():
            if any(folder.glob("*.png")):
                seen.append(time.perf_counter())
                found.set()
                return
            time.sleep(0.005)

    request = GenerateRequest(prompts=["a red circle on the left"], out=folder, num_images_per_prompt=images, seed=0,
                              progress=False)
    started = time.perf_counter()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    records = run_generate(request, pipeline=pipeline)
    for _ in records:
        if found.is_set():
            break
    found.wait()
    records.close()
    return seen[0] - started  # when the watcher saw the file, not when the record was yielded (one batch later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--short", type=int, default=8)
    args = parser.parse_args()
    import genkit

    pipeline = genkit.load()
    with tempfile.TemporaryDirectory() as tmp:
        short = first_png(pipeline, args.short, Path(tmp) / "short")
        long = first_png(pipeline, args.images, Path(tmp) / "long")
    print(f"first PNG, {args.short}-image run:  {short:.2f} s (one batch of {min(8, args.short)})")
    print(f"first PNG, {args.images}-image run: {long:.2f} s   ratio {long / short:.2f}x the short run's")


if __name__ == "__main__":
    main()
