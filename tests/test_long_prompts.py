"""CLIP prompts past 75 tokens are read in 75-token chunks, as A1111 reads them (#16).

All of a long prompt counts (its tail changes the image), a prompt that fits is read exactly as diffusers reads
it, an image's pixels still depend on nothing but its own prompt, negative and seed (batch-mates of other
lengths included), and the record says how the prompt was read so that replay makes the same image.
"""

import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

import genkit
from genkit import families
from genkit.families import clip_chunks
from genkit.prompts import PromptSpec, PromptWarning
from genkit.testing import FAMILIES, WORDS, build_tiny, clip_tokenizer


def words(rng: random.Random, n: int, commas: float = 0.0) -> str:
    return " ".join(rng.choice(WORDS) + ("," if rng.random() < commas else "") for _ in range(n))


def pixels(result) -> list:
    return [np.asarray(image) for image in result.images]


@pytest.mark.parametrize("seed", range(40))
def test_chunks_keep_every_token_and_break_after_a_late_comma(seed):
    rng = random.Random(seed)
    tokenizer = clip_tokenizer()
    text = words(rng, rng.randrange(1, 400), commas=rng.choice([0.0, 0.03, 0.1, 0.5]))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    comma = tokenizer(",", add_special_tokens=False).input_ids[0]
    chunks = clip_chunks.split(tokenizer, text)
    assert [t for chunk in chunks for t in chunk] == ids  # nothing lost, nothing reordered
    assert all(0 < len(chunk) <= clip_chunks.CHUNK for chunk in chunks)
    for chunk, after in zip(chunks, chunks[1:]):
        if len(chunk) < clip_chunks.CHUNK:  # cut short: right after a comma in what would have been the last 20
            assert chunk[-1] == comma and len(chunk) > clip_chunks.CHUNK - clip_chunks.BACKTRACK
            assert comma not in after[:clip_chunks.CHUNK - len(chunk)] or after[0] == comma
        else:  # full: no comma in its last 20 tokens (it would have broken there) unless it ends with one or the
            # next token is one (A1111 breaks when a token past the full chunk arrives, and a comma never breaks)
            tail = chunk[-clip_chunks.BACKTRACK:]
            assert comma not in tail or chunk[-1] == comma or after[0] == comma
    assert clip_chunks.count(tokenizer, text) == len(chunks)


def test_a1111_example():
    """A1111 on 70 words, a comma, 10 words: the 75-token chunk would end 5 tokens past the comma, so the first
    chunk is the 71 tokens up to the comma and the second the 10 words after it."""
    tokenizer = clip_tokenizer()
    text = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)
    first, second = clip_chunks.split(tokenizer, text)
    assert len(first) == 71 and len(second) == 10
    rows = clip_chunks.token_rows(tokenizer, [text, "red"], 2)
    assert rows.shape == (4, 77) and rows[0, 0] == tokenizer.bos_token_id and rows[0, 72] == tokenizer.eos_token_id
    assert rows[3].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 75


@pytest.fixture(scope="module", params=[f for f in FAMILIES if "chunk" in families.get(f).long_prompts])
def pipeline(request, tmp_path_factory):
    folder = build_tiny(request.param, tmp_path_factory.mktemp("long") / request.param)
    return genkit.load(str(folder), device="cpu")


def run(pipeline, prompts, mode="chunk", **settings):
    pipeline.set_long_prompts(mode)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pipeline.generate(prompts, num_inference_steps=2, seed=3, **settings)
    finally:
        pipeline.set_long_prompts("chunk")
    return result, [w for w in caught if issubclass(w.category, PromptWarning)]


def test_the_tail_of_a_long_prompt_changes_the_image(pipeline):
    rng = random.Random(1)
    head = words(rng, 80)
    a, b = (PromptSpec(head + " " + words(rng, 12), seed=3) for _ in range(2))  # same seed, differ past token 75
    chunked, said = run(pipeline, [a, b])
    assert not said and [m["prompt_chunks"] for m in chunked.metadata] == [2, 2]
    assert "prompt_truncated" not in chunked.metadata[0]
    first, second = pixels(chunked)
    assert np.abs(first.astype(int) - second).max() > 0
    cut, said = run(pipeline, [a, b], mode="truncate")
    first, second = pixels(cut)
    assert np.array_equal(first, second) and len(said) == 2  # diffusers' cut: same image, said for each prompt
    assert cut.metadata[0]["prompt_truncated"]["tokens"] == 77 and "prompt_chunks" not in cut.metadata[0]


def test_a_prompt_that_fits_is_read_as_diffusers_reads_it(pipeline):
    prompt = words(random.Random(2), 30)
    chunked, _ = run(pipeline, [prompt], negative_prompt="blue square")
    cut, _ = run(pipeline, [prompt], mode="truncate", negative_prompt="blue square")
    assert np.array_equal(pixels(chunked)[0], pixels(cut)[0]) and "prompt_chunks" not in chunked.metadata[0]


@pytest.mark.parametrize("seed", range(3))
def test_pixels_do_not_depend_on_batch_mates_of_other_lengths(pipeline, seed):
    rng = random.Random(seed)
    prompts = [words(rng, rng.choice([5, 60, 90, 170])) for _ in range(5)]
    negative = words(rng, rng.choice([0, 3, 100]))
    together, _ = run(pipeline, prompts, batch_size=rng.choice([2, 5]), negative_prompt=negative)
    for i, prompt in enumerate(prompts):
        alone, _ = run(pipeline, [PromptSpec(prompt, seed=3 + i)], negative_prompt=negative)
        assert np.array_equal(pixels(alone)[0], pixels(together)[i]), (seed, i)


def test_past_the_last_chunk_the_rest_is_cut_and_said(pipeline):
    prompt = words(random.Random(4), clip_chunks.CHUNK * clip_chunks.MAX_CHUNKS + 20)
    result, said = run(pipeline, [prompt])
    assert result.metadata[0]["prompt_chunks"] == clip_chunks.MAX_CHUNKS and len(said) == 1
    assert result.metadata[0]["prompt_truncated"]["tokens"] == clip_chunks.CHUNK * clip_chunks.MAX_CHUNKS


@pytest.mark.slow  # a real process or the real model: the full suite (.ci/run) runs it
def test_replay_reads_the_prompt_as_it_was_read(tiny_sd, tmp_path):
    from genkit.run import replay_image

    long = words(random.Random(5), 100)
    for mode in ("chunk", "truncate"):
        out = tmp_path / mode
        done = subprocess.run([sys.executable, "-m", "genkit", "generate", long, "--model", str(tiny_sd), "--steps",
                               "2", "--seed", "1", "--out", str(out), "--long-prompts", mode, "--quiet"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        image = next(out.glob("*.png"))
        assert replay_image(image).identical, mode


def test_chunking_a_model_without_clip_is_one_line(tiny_mini, tmp_path):
    done = subprocess.run([sys.executable, "-m", "genkit", "generate", "a red circle", "--model", str(tiny_mini),
                           "--out", str(tmp_path / "out"), "--long-prompts", "chunk"], capture_output=True, text=True)
    assert done.returncode == 2 and "chunking is for CLIP models" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
