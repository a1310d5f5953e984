"""Contracts every pipeline kind keeps: run once on the tiny SD model and once on a tiny genkit-mini."""

import numpy as np
import pytest

import genkit
from genkit import schedulers
from genkit.attention import Attention
from genkit.errors import GenkitError

FAST = dict(num_inference_steps=2, seed=11)


def pixels(result):
    return [np.asarray(image) for image in result.images]


@pytest.fixture(scope="module", params=["tiny_sd", "tiny_mini"])
def pipe(request):
    """One loaded pipeline per kind for the whole module (the tests here only generate with it)."""
    return genkit.load(str(request.getfixturevalue(request.param)), device="cpu")


def test_batch_of_four_equals_four_singles(pipe):
    batched = pipe.generate(["a red circle", "a blue square"], num_images_per_prompt=2, batch_size=4, **FAST)
    singles = pipe.generate(["a red circle", "a blue square"], num_images_per_prompt=2, batch_size=1, **FAST)
    assert len(batched.images) == 4
    for a, b in zip(pixels(batched), pixels(singles)):
        assert np.array_equal(a, b)


def test_batch_invariance_without_guidance(pipe):
    batched = pipe.generate(["a", "b", "c"], batch_size=3, guidance_scale=0.0, **FAST)
    singles = pipe.generate(["a", "b", "c"], batch_size=1, guidance_scale=0.0, **FAST)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(batched), pixels(singles)))


def test_num_images_per_prompt_and_seeds(pipe):
    result = pipe.generate(["first", "second"], num_images_per_prompt=3, batch_size=4, **FAST)
    assert result.seeds == [11, 12, 13, 14, 15, 16]
    assert [m["prompt"] for m in result.metadata] == ["first"] * 3 + ["second"] * 3
    assert [m["index"] for m in result.metadata] == list(range(6))
    first = pixels(result)
    assert not np.array_equal(first[0], first[1])  # different seeds, different images


def test_image_depends_on_its_seed_only(pipe):
    in_run = pipe.generate(["first", "second"], num_images_per_prompt=3, batch_size=2, **FAST)
    assert in_run.metadata[2]["prompt"] == "first" and in_run.seeds[2] == 13
    alone = pipe.generate(["first"], seed=13, num_inference_steps=2)
    assert np.array_equal(pixels(alone)[0], pixels(in_run)[2])


def test_iterator_yields_batches(pipe):
    results = list(pipe.iter_generate(["a", "b", "c"], batch_size=2, **FAST))
    assert [len(r.images) for r in results] == [2, 1]


def test_every_scheduler_runs(pipe):
    for name in pipe.family.samplers() + ("default",):
        result = pipe.generate(["a red circle"], scheduler=name, guidance_scale=4.0, num_inference_steps=3, seed=0)
        image = pixels(result)[0]
        assert image.std() > 0, name  # not a blank image; NaNs would come out as zeros
        assert result.metadata[0]["scheduler"] == name


def test_attention_backends_agree(model_dir):
    pipe = genkit.load(str(model_dir), device="cpu", attention="sdpa")
    reference = pipe.generate(["a red circle"], **FAST).images[0]
    for backend in (Attention.SLICED, Attention.MATH):
        pipe.set_attention(backend)
        image = pipe.generate(["a red circle"], **FAST).images[0]
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int))
        assert diff.max() <= 2, backend


def test_xformers_on_cpu_is_a_clear_error(model_dir):
    with pytest.raises(GenkitError, match="xformers needs a CUDA device"):
        genkit.load(str(model_dir), device="cpu", attention="xformers")


def test_save_load_round_trip(pipe, tmp_path):
    before = pipe.generate(["a red circle"], **FAST)
    pipe.pipe.save_pretrained(tmp_path / "copy", safe_serialization=True)
    again = genkit.load(str(tmp_path / "copy"), device="cpu").generate(["a red circle"], **FAST)
    assert np.array_equal(pixels(before)[0], pixels(again)[0])


def test_records_hold_everything_needed(pipe):
    record = pipe.generate(["a red circle"], negative_prompt="blue", **FAST).metadata[0]
    for key in ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width", "height",
                "scheduler", "model", "lora", "attention", "dtype", "versions"):
        assert key in record
    assert record["negative_prompt"] == "blue" and record["attention"] == "sdpa"


def test_prompt_embedding_does_not_depend_on_its_batch_mates(pipe):
    """Element-wise kernels treat a tensor's last values apart (scalar tail); a prompt's embedding must not care."""
    import torch

    from genkit.invariance import rows_apart

    tokenizer, encoder = pipe.pipe.tokenizer, pipe.pipe.text_encoder

    def embed(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=min(tokenizer.model_max_length, 77),
                        truncation=True, return_tensors="pt").input_ids
        return encoder(ids)[0]

    with torch.inference_mode(), rows_apart(encoder):
        alone, last, first = embed(["first"])[0], embed(["second", "first"])[1], embed(["first", "second", "x"])[0]
    assert torch.equal(alone, last) and torch.equal(alone, first)
    assert "forward" not in encoder.__dict__  # the class's forward again afterwards


@pytest.mark.slow
def test_compiled_unet_makes_nearly_the_same_images(model_dir):
    """--compile (torch.compile): pixels within 2 levels of eager, and the record says it was compiled."""
    eager = genkit.load(str(model_dir), device="cpu")
    reference = eager.generate(["a red circle", "a blue square"], batch_size=2, **FAST)
    compiled = genkit.load(str(model_dir), device="cpu").compile()
    result = compiled.generate(["a red circle", "a blue square"], batch_size=2, **FAST)
    assert result.metadata[0]["compiled"] is True and "compiled" not in reference.metadata[0]
    for a, b in zip(pixels(reference), pixels(result)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_freed_memory_stays_in_the_process():
    import sys

    from genkit import cpu

    if sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc":
        assert cpu.keep_freed_memory() is True
