"""Steps per second of `genkit train lora` against a plain diffusers + peft loop that re-encodes every step.

Both train the same LoRA (rank, alpha, target layers, AdamW, learning rate) on the same tiny
Stable Diffusion model (genkit.testing.build_tiny_sd, in a temporary folder), on the same
images and captions with the same batch size, on the same device and thread count. The plain
loop does what diffusers' train_text_to_image_lora.py does each step: load and crop the images,
tokenize and encode the captions, encode the images with the VAE. genkit encodes each caption
and image once before its loop; that setup time is printed too.

    python benchmarks/train_lora.py [--steps 40] [--batch-size 4] [--resolution 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genkit.testing import build_tiny_sd  # noqa: E402

RANK, ALPHA, LEARNING_RATE, TARGETS = 4, 4.0, 1e-4, ["to_q", "to_k", "to_v", "to_out.0"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (140, 30, 160), (240, 140, 20),
           (20, 20, 20), (200, 200, 200)]
NAMES = ["red", "green", "blue", "yellow", "purple", "orange", "black", "grey"]


def make_dataset(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True)
    for i, (colour, name) in enumerate(zip(COLOURS, NAMES)):
        pixels = np.full((size, size + size // 8, 3), colour, dtype=np.uint8)
        pixels[size // 4:size // 2, size // 4 + i:size // 2 + i] = 255
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} picture with a white square")
    return folder


def plain_loop(model: Path, data: Path, steps: int, batch_size: int, resolution: int, device: str) -> float:
    """A minimal diffusers + peft loop without caching; returns the loop's steps per second."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from genkit.data.decode import load_image, to_tensor
    from genkit.data.imagefolder import scan_folder

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None).to(device)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for part in (unet, vae, text_encoder):
        part.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-2)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    items = scan_folder(data).items
    unet.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = [items[(step * batch_size + j) % len(items)] for j in range(batch_size)]
        pixels = torch.stack([to_tensor(load_image(item.path, resolution)) for item in batch]).to(device)
        tokens = tokenizer([item.caption for item in batch], padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = text_encoder(tokens.input_ids.to(device))[0]
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device)
        prediction = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - started)


def genkit_loop(model: Path, data: Path, out: Path, steps: int, batch_size: int, resolution: int,
                threads: int) -> tuple[float, float]:
    """(steps per second of genkit's loop, seconds from the call to the loop's first step)."""
    import genkit

    started = time.perf_counter()
    genkit.train_lora(data, out, model=str(model), progress=False, overrides=[
        f"train.steps={steps}", f"train.batch_size={batch_size}", "train.gradient_accumulation_steps=1",
        f"train.learning_rate={LEARNING_RATE}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
        f"data.resolution={resolution}", "validation.every=0", f"train.checkpoint_every={steps}",
        f"train.threads={threads}",
    ])
    total = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    loop = log[-1]["time"]  # from the loop's start to the end of its last step
    return steps / loop, total - loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64, help="pixels (the tiny model's own size is 64)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_sd(root / "tiny-sd")
        data = make_dataset(root / "data", args.resolution)
        plain = plain_loop(model, data, args.steps, args.batch_size, args.resolution, device)
        ours, setup = genkit_loop(model, data, root / "lora", args.steps, args.batch_size, args.resolution,
                                  args.threads)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} steps, batch {args.batch_size}, "
          f"{args.resolution}px, {len(COLOURS)} images")
    print(f"plain diffusers + peft (encodes every step): {plain:8.2f} steps/s")
    print(f"genkit train lora (cached encodings):        {ours:8.2f} steps/s  "
          f"(setup, loading and caching included: {setup:.2f} s)")
    print(f"ratio genkit / plain: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
