"""Where a `genkit generate` run spends its time: a cProfile of the engine, grouped, for any checkout.

    python benchmarks/profile_engine.py                       # this checkout
    python benchmarks/profile_engine.py --repo OLD_CHECKOUT   # the same run on another version (git worktree)

One run of `genkit.run.run_generate` on the shipped genkit-mini: 40 images (10 distinct prompts x 4
seeds, as a prompts file with repeats reads), batch 20, 20 steps, one CPU thread, into a temporary
folder. Printed: the wall time and images/s, then the profiled main thread's time grouped by where it
went (the UNet, the text encoder, writing PNGs and records, genkit's exactness dispatch, planning),
as seconds and as a share of the wall time. cProfile sees only the main thread, so work moved to the
writer thread leaves the table; the wall time says what the move bought. Profiling slows Python-heavy
parts more than kernels: compare two versions under the same profiler, not with unprofiled figures.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

# (group, file suffix, function name, measure): "cum" = cumulative time of the function, "tot" = its own time
GROUPS = [
    ("UNet forward", "unet_2d_condition.py", "forward", "cum"),
    ("text encoder", "modeling_bert.py", "forward", "cum"),
    ("PNG writing (main thread)", "outputs.py", "save_png", "cum"),
    ("records", "generate.py", "record", "cum"),
    ("planning", "generate.py", "plan", "cum"),
    ("exactness dispatch (Python)", "invariance.py", "__torch_function__", "tot"),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose genkit to profile (default: this one)")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--distinct", type=int, default=10, help="distinct prompts among the images")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(args.repo.resolve()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    import genkit
    from genkit.prompts import PromptSpec
    from genkit.run import GenerateRequest, run_generate

    assert Path(genkit.__file__).resolve().is_relative_to(args.repo.resolve()), genkit.__file__
    # the shipped weights by path and the preset's settings spelled out: older versions read presets differently
    pipeline = genkit.load(str(args.repo / "genkit" / "weights" / "genkit-mini"), device="cpu")
    settings = dict(num_inference_steps=20, guidance_scale=4.0, scheduler="dpm++", progress=False)
    words = ["red circle", "blue square", "green triangle", "yellow star", "purple heart"]
    specs = [PromptSpec(f"a {words[k % len(words)]} number {k % args.distinct}", seed=k) for k in range(args.images)]
    with tempfile.TemporaryDirectory() as out:
        warm = GenerateRequest(prompts=specs[:2], out=Path(out) / "warm", batch_size=2, **settings)
        list(run_generate(warm, pipeline=pipeline))
        request = GenerateRequest(prompts=specs, out=Path(out) / "run", batch_size=args.batch_size, **settings)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        list(run_generate(request, pipeline=pipeline))
        profile.disable()
        wall = time.perf_counter() - start
    stats = pstats.Stats(profile).stats
    print(f"genkit at {args.repo.name or args.repo}: {args.images} images ({args.distinct} distinct prompts), "
          f"batch {args.batch_size}, {args.threads} thread(s): {wall:.1f} s, {args.images / wall:.2f} images/s")
    print(f"{'where':<30} {'seconds':>8} {'of wall':>8}")
    for label, suffix, name, measure in GROUPS:
        found = [(tt, ct) for (file, _, func), (_, _, tt, ct, _) in stats.items() if file.endswith(suffix) and func == name]
        # own time adds up over every function of that name; cumulative time is the outermost one's (a model's
        # forward holds its layers' forwards, defined in the same file)
        seconds = sum(tt for tt, _ in found) if measure == "tot" else max((ct for _, ct in found), default=0.0)
        print(f"{label:<30} {seconds:8.2f} {100 * seconds / wall:7.1f}%")


if __name__ == "__main__":
    main()
