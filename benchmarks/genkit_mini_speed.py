"""genkit-mini's generation speed against this CPU's own matmul limit, and cold-start time.

    python benchmarks/genkit_mini_speed.py [--batch-size 50] [--images 100]

1. Counts the decoder's FLOPs per image: one UNet forward on the guidance batch (conditional +
   unconditional) times the number of steps (torch.utils.flop_counter, plus the attention
   matmuls QK^T and PV, which its table leaves out for PyTorch's CPU flash-attention kernel).
2. Measures the machine's matmul GFLOP/s in the same run (fp32 and bf16, 1024x1024, all threads).
3. Times generation at the preset's defaults: fp32 as `genkit.load` sets it up on a CPU
   (genkit.cpu tuning), fp32 without that tuning (the baseline), and bf16; prints achieved
   GFLOP/s as a share of the matmul figure of the same precision.
4. Times `genkit generate "a red circle"` from a cold process start to a written PNG.

Run it in a fresh process: the memory setting of genkit.cpu is process-wide, so the untuned
baseline runs first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# PyTorch's flop counter has formulas for the CUDA attention kernels only; the CPU one does the same matmuls.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                   lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v)}


def matmul_gflops(dtype, size: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def unet_flops_per_image(pipe, steps: int, guidance: float) -> tuple[float, float]:
    """(all FLOPs, attention's share) per image."""
    unet = pipe.pipe.unet
    size = unet.config.sample_size
    branches = 2 if guidance > 1 else 1
    x = torch.randn(branches, 3, size, size, dtype=unet.dtype)
    hidden = torch.randn(branches, 24, 384, dtype=unet.dtype)
    mask = torch.ones(branches, 24, dtype=torch.long)
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter, torch.no_grad():
        unet(x, torch.tensor(500), encoder_hidden_states=hidden, encoder_attention_mask=mask)
    counts = counter.get_flop_counts()["Global"]
    attention = sum(n for op, n in counts.items() if "attention" in str(op))
    return counter.get_total_flops() * steps, attention * steps


def images_per_second(dtype: str, images: int, batch_size: int, tuned: bool = True) -> tuple[float, object]:
    import genkit

    pipe = genkit.load("genkit-mini", device="cpu", dtype=dtype, keep_freed_memory=tuned)
    prompts = [f"a red circle on the left {i}" for i in range(images)]
    pipe.generate(prompts[:batch_size], seed=0, batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    pipe.generate(prompts, seed=0, batch_size=batch_size)
    return images / (time.perf_counter() - start), pipe


def cold_start() -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "genkit", "generate", "a red circle", "--seed", "1", "--out", out,
                        "--quiet"], check=True, capture_output=True)
        seconds = time.perf_counter() - start
        assert list(Path(out).glob("*.png"))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"matmul 1024^3 on {torch.get_num_threads()} threads: fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s ({peak['bf16'] / peak['fp32']:.2f}x)")
    baseline = None
    for dtype, tuned, label in (("fp32", False, "fp32 untuned"), ("fp32", True, "fp32"), ("bf16", True, "bf16")):
        rate, pipe = images_per_second(dtype, args.images, args.batch_size, tuned)
        if tuned and dtype == "fp32":  # the limit again, under genkit.cpu's memory setting; the higher one counts
            again = {key: matmul_gflops(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[key])) for key in peak}
            peak = {key: max(peak[key], again[key]) for key in peak}
            print(f"matmul again after genkit.load: fp32 {again['fp32']:.0f}, bf16 {again['bf16']:.0f} GFLOP/s "
                  "(the higher of the two figures is the limit below)")
        d = pipe.defaults
        flops, attention = unet_flops_per_image(pipe, d["num_inference_steps"], d["guidance_scale"])
        achieved = rate * flops / 1e9
        baseline = baseline or rate
        print(f"{label:>12}: {rate:5.2f} images/s ({rate / baseline:.2f}x) at {d['num_inference_steps']} steps, "
              f"guidance {d['guidance_scale']} (batch {args.batch_size}); decoder {flops / 1e9:.2f} GFLOP/image "
              f"({attention / flops:.0%} attention) -> {achieved:.0f} GFLOP/s = {achieved / peak[dtype]:.2f} of the "
              f"{dtype} matmul rate (within 2x means >= 0.50)")
    runs = [cold_start() for _ in range(3)]
    print(f"cold start to a written PNG (genkit generate \"a red circle\"): {min(runs):.1f} s best, "
          f"{max(runs):.1f} s worst of 3")


if __name__ == "__main__":
    main()
