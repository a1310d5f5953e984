"""genkit.testing: every family's tiny pipeline saves, loads back like a user's folder, and generates."""

import random

import numpy as np
import pytest
import torch

import genkit
from genkit import families, testing

DIFFUSERS_FAMILIES = [f for f in testing.FAMILIES if families.get(f).file_format == "diffusers"]
RANDOM_SEEDS = range(3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate_with_diffusers(folder, family):
    """Load `folder` with plain DiffusionPipeline.from_pretrained and make one 2-step image."""
    pipe = testing.plain_pipeline(folder)  # an editing model's text-to-image pipeline on its components
    pipe.set_progress_bar_config(disable=True)
    height, width = testing.TINY_SIZE[family]
    return pipe(prompt="a red circle on the left", num_inference_steps=2, height=height, width=width,
                generator=torch.Generator("cpu").manual_seed(0), **testing.CALL_ARGS.get(family, {})).images[0]


def assert_image(image, size):
    assert image.size == size  # PIL: (width, height)
    pixels = np.asarray(image)
    assert pixels.shape == (size[1], size[0], 3) and pixels.std() > 0, "a constant image"


@pytest.mark.parametrize("family", DIFFUSERS_FAMILIES)
def test_default_tiny_model_loads_and_generates(family, tmp_path):
    folder = testing.build_tiny(family, tmp_path / family)
    assert (folder / "model_index.json").is_file()
    assert not list(folder.rglob("*.bin")), "weights must be safetensors"
    height, width = testing.TINY_SIZE[family]
    assert_image(generate_with_diffusers(folder, family), (width, height))


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
@pytest.mark.parametrize("family", DIFFUSERS_FAMILIES)
def test_random_architecture_loads_and_generates(family, seed, tmp_path):
    arch = testing.random_arch(family, random.Random(seed))
    folder = testing.build_tiny(family, tmp_path / family, seed=seed, arch=arch)
    height, width = testing.TINY_SIZE[family]
    assert_image(generate_with_diffusers(folder, family), (width, height))


@pytest.mark.parametrize("seed", [None, *RANDOM_SEEDS])
def test_genkit_mini_through_genkit_load(seed, tmp_path):
    arch = None if seed is None else testing.random_arch("genkit-mini", random.Random(seed))
    folder = testing.build_tiny("genkit-mini", tmp_path / "mini", arch=arch)
    image = genkit.load(folder, device="cpu").generate(["a red circle"], num_inference_steps=2, seed=0).images[0]
    size = (arch or testing.DEFAULT_ARCH["genkit-mini"])["sample_size"]
    assert_image(image, (size, size))


def test_random_arch_is_reproducible_and_varied():
    for family in testing.FAMILIES:
        assert testing.random_arch(family, random.Random(7)) == testing.random_arch(family, random.Random(7))
        drawn = {repr(testing.random_arch(family, random.Random(seed))) for seed in range(10)}
        assert len(drawn) > 5, family
        assert set(testing.random_arch(family, random.Random(0))) == set(testing.DEFAULT_ARCH[family])


def test_bad_family_or_arch_key(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        testing.build_tiny("sd4", tmp_path)
    with pytest.raises(ValueError, match="no architecture keys"):
        testing.build_tiny("sd", tmp_path, arch={"channels": (8,)})


@pytest.mark.parametrize("make", [testing.clip_tokenizer, testing.t5_tokenizer, testing.gemma_tokenizer])
def test_tokenizers_know_prompt_words_and_round_trip(make, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = make()
    prompt = "a photo of a cat, a red circle on the left"
    pieces = tokenizer.tokenize(prompt)
    assert len(pieces) == 12, pieces  # one token per word, one for the comma
    assert tokenizer.unk_token not in pieces
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(prompt).input_ids == tokenizer(prompt).input_ids
