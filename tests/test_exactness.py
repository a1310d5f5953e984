"""Exactness as a property: an image's pixels depend on its prompt, settings and seed, never on its batch.

Every case draws a random tiny architecture (widths, group counts, head sizes and counts, depths, VAE
depth, cross-attention sizes; genkit.testing.random_arch) from a seeded generator, so a failure names
its family and seed and reproduces. Each makes a run of mixed prompts (one with a negative prompt)
one image at a time, then again at a batch size drawn from 2..16 (batches span prompts), and compares
every pixel.
A subset compares two processes with one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import genkit
from genkit import families
from genkit.prompts import PromptSpec
from genkit.testing import FAMILIES, TINY_SIZE, build_tiny, random_arch

UNET_FAMILIES = tuple(name for name in FAMILIES if families.get(name).denoiser_name == "unet")
TRANSFORMER_FAMILIES = tuple(name for name in FAMILIES if families.get(name).denoiser_name == "transformer")
CASES = [(f, s) for f in UNET_FAMILIES for s in range(20)] + [(f, s) for f in TRANSFORMER_FAMILIES for s in range(5)]
WORDS = ["a red circle", "a blue square on the left", "a green triangle above a yellow circle", "a purple star",
         "a photo of a cat"]


def random_run(family: str, seed: int):
    """(architecture, prompts, images per prompt, batch sizes to compare with 1) for one case."""
    rng = random.Random(f"{family}:{seed}")
    arch = random_arch(family, rng)
    prompts = [PromptSpec(p) for p in rng.sample(WORDS, rng.randint(2, 3))]
    prompts[0] = PromptSpec(prompts[0].prompt, negative_prompt="blurry")
    per_prompt = rng.randint(2, 4)
    return arch, prompts, per_prompt, [rng.randint(2, 16)]


@pytest.mark.parametrize("family,seed", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_pixels_do_not_depend_on_the_batch(family, seed, tmp_path):
    arch, prompts, per_prompt, sizes = random_run(family, seed)
    folder = build_tiny(family, tmp_path / "model", seed=seed, arch=arch)
    pipe = genkit.load(str(folder), device="cpu")
    if not pipe.family.negative_prompt:  # Flux.1 and Flux.2 [klein] take no negative prompt
        prompts = [PromptSpec(p.prompt) for p in prompts]
    width, height = TINY_SIZE[family]
    side = max(pipe.size_factor, width)
    settings = dict(num_images_per_prompt=per_prompt, seed=seed * 100, num_inference_steps=1, width=side, height=side)
    alone = [np.asarray(image) for image in pipe.generate(prompts, batch_size=1, **settings).images]
    for size in sizes:
        batched = [np.asarray(image) for image in pipe.generate(prompts, batch_size=size, **settings).images]
        differ = [i for i, (a, b) in enumerate(zip(alone, batched)) if not np.array_equal(a, b)]
        assert not differ, (f"{family} seed {seed}, batch {size}: images {differ} differ from the same images made "
                            f"alone (largest difference {max(np.abs(alone[i].astype(int) - batched[i]).max() for i in differ)}; "
                            f"arch {arch})")


# --- Processes -------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}  # accelerate gives each process one thread
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          os.path.join(REPO, "configs", "accelerate", "cpu-2proc.yaml"), "-m", "genkit"]


@pytest.mark.slow
@pytest.mark.parametrize("family,seed", [("sd", 101), ("sd3", 102)])
def test_two_processes_make_the_images_of_one(family, seed, tmp_path):
    arch, prompts, per_prompt, sizes = random_run(family, seed)
    folder = build_tiny(family, tmp_path / "model", seed=seed, arch=arch)
    side = str(max(TINY_SIZE[family][0], genkit.load(str(folder), device="cpu").size_factor))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p.prompt, **({"negative_prompt": p.negative_prompt}
                                                if p.negative_prompt else {})}) + "\n" for p in prompts))
    args = ["generate", "--prompts-file", str(prompts_file), "-n", str(per_prompt), "--seed", "7", "--steps", "2",
            "-W", side, "-H", side, "--batch-size", str(sizes[0]), "--model", str(folder), "--quiet"]
    one = subprocess.run([sys.executable, "-m", "genkit", *args, "--out", str(tmp_path / "one")], env=ENV,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(LAUNCH + args + ["--out", str(tmp_path / "two")], env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    a = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "one").glob("*.png")}
    b = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "two").glob("*.png")}
    assert a.keys() == b.keys() and len(a) == len(prompts) * per_prompt
    assert [name for name in a if not np.array_equal(a[name], b[name])] == []


def test_exact_is_the_default_on_the_cpu_only(tiny_sd):
    import genkit
    from genkit.loader import default_exact

    assert [default_exact(d) for d in ("cpu", "cpu:0", "cuda", "cuda:1", "mps")] == [True, True, False, False, False]
    assert genkit.load(str(tiny_sd), device="cpu").exact is True
    assert genkit.load(str(tiny_sd), device="cpu", exact=False).exact is False
