"""genkit-mini's generation speed against this CPU's own matmul limit, and cold-start time.

    python benchmarks/genkit_mini_speed.py [--batch-size 50] [--images 100] [--compile]

1. Counts the decoder's FLOPs per image: one UNet forward on the guidance batch (conditional +
   unconditional) times the number of steps (torch.utils.flop_counter, plus the attention
   matmuls QK^T and PV, which its table leaves out for PyTorch's CPU flash-attention kernel).
2. Measures the machine's matmul GFLOP/s in the same run (fp32 and bf16, 1024x1024, all threads).
3. Times generation at the preset's defaults: fp32 without genkit.cpu's memory setting (the
   baseline), fp32 as `genkit.load` sets it up on a CPU, with --compile also Pipeline.compile(),
   and bf16. Prints achieved GFLOP/s as a share of the same precision's matmul rate, measured
   just before and after each timing (this machine's rate drifts by several percent), and of the
   highest matmul rate the run saw.
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


def images_per_second(dtype: str, images: int, batch_size: int, tuned: bool = True,
                      compile: bool = False) -> tuple[float, object, float]:
    """(images/s, pipeline, seconds of the warm-up batch, which holds the compile when there is one)."""
    import genkit

    pipe = genkit.load("genkit-mini", device="cpu", dtype=dtype, keep_freed_memory=tuned)
    if compile:
        pipe.compile()
    prompts = [f"a red circle on the left {i}" for i in range(images)]
    start = time.perf_counter()
    pipe.generate(prompts[:batch_size], seed=0, batch_size=batch_size)  # warm-up (and compile)
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    pipe.generate(prompts, seed=0, batch_size=batch_size)
    return images / (time.perf_counter() - start), pipe, warm_up


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
    parser.add_argument("--compile", action="store_true", help="also time Pipeline.compile() (adds ~1 min)")
    args = parser.parse_args()

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak = {key: matmul_gflops(value) for key, value in torch_dtype.items()}
    print(f"matmul 1024^3 on {torch.get_num_threads()} threads: fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s ({peak['bf16'] / peak['fp32']:.2f}x)")
    # The untuned baseline first: genkit.cpu's memory setting is process-wide and stays on.
    runs = (("fp32 untuned", "fp32", False, False), ("fp32", "fp32", True, False),
            ("fp32 compiled", "fp32", True, True), ("bf16", "bf16", True, False))
    baseline = None
    for label, dtype, tuned, compiled in runs:
        if label == "fp32 compiled" and not args.compile:
            continue
        before = matmul_gflops(torch_dtype[dtype])
        rate, pipe, warm_up = images_per_second(dtype, args.images, args.batch_size, tuned, compiled)
        after = matmul_gflops(torch_dtype[dtype])
        peak[dtype] = max(peak[dtype], before, after)
        near = (before + after) / 2
        d = pipe.defaults
        flops, attention = unet_flops_per_image(pipe, d["num_inference_steps"], d["guidance_scale"])
        achieved = rate * flops / 1e9
        baseline = baseline or rate
        print(f"{label:>13}: {rate:5.2f} images/s ({rate / baseline:.2f}x) at {d['num_inference_steps']} steps, "
              f"guidance {d['guidance_scale']}, batch {args.batch_size} (first batch {warm_up:.0f} s); "
              f"decoder {flops / 1e9:.2f} GFLOP/image ({attention / flops:.0%} attention) -> {achieved:.0f} GFLOP/s "
              f"= {achieved / near:.2f} of the {dtype} matmul rate measured around it ({near:.0f}), "
              f"{achieved / peak[dtype]:.2f} of the run's highest ({peak[dtype]:.0f}); within 2x means >= 0.50")
    cold = [cold_start() for _ in range(3)]
    print(f"cold start to a written PNG (genkit generate \"a red circle\"): {min(cold):.1f} s best, "
          f"{max(cold):.1f} s worst of 3")


if __name__ == "__main__":
    main()
