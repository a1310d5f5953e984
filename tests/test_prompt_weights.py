"""Prompt weights in A1111's syntax (#28): (word:1.3), (word), [word], \\(, BREAK, read by genkit.prompt_syntax and
applied by compel to the CLIP families' text states (genkit.families.clip_weights).

A weight moves the weighted word's states and nothing else; a prompt without the syntax is read exactly as before
(same pixels, same record); `prompt_syntax="plain"` reads brackets as text; a family whose encoder takes no weights
says so in one line.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import genkit
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.families import clip_chunks, clip_weights
from genkit.generate import GenerationConfig
from genkit.outputs import read_record
from genkit.prompt_syntax import has_syntax, parse
from genkit.prompts import PromptSpec
from genkit.testing import build_tiny, clip_tokenizer

pytest.importorskip("compel")

PLAIN = ["a red circle on the left", "a blue square, a green triangle", "two yellow circles at the top",
         "a red: blue square"]  # a colon outside brackets is text


def pixels(result) -> list:
    return [np.asarray(image) for image in result.images]


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return genkit.load(str(tiny_sd), device="cpu")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return genkit.load(str(build_tiny("sdxl", tmp_path_factory.mktemp("weights") / "sdxl")), device="cpu")


@pytest.mark.parametrize("text, pieces", [
    ("a (red:1.3) circle", (("a ", 1.0), ("red", 1.3), (" circle", 1.0))),
    ("a (red) circle", (("a ", 1.0), ("red", 1.1), (" circle", 1.0))),
    ("a [red] circle", (("a ", 1.0), ("red", 1 / 1.1), (" circle", 1.0))),
    ("((red)) circle", (("red", 1.1 * 1.1), (" circle", 1.0))),
    ("(a [red] circle:2)", (("a ", 2.0), ("red", 2 / 1.1), (" circle", 2.0))),
    (r"a \(red\) circle", (("a (red) circle", 1.0),)),
    ("a red circle BREAK a blue square", (("a red circle", 1.0), (None, 0.0), ("a blue square", 1.0))),
    ("(open red", (("open red", 1.1),)),  # left open: weighs the rest, as A1111
    ("a red) circle", (("a red) circle", 1.0),)),  # closes nothing: text
    ("a red: blue", (("a red: blue", 1.0),)),
])
def test_the_parser_reads_a1111s_syntax(text, pieces):
    found = parse(text)
    assert [piece for piece, _ in found] == [piece for piece, _ in pieces]
    assert [weight for _, weight in found] == pytest.approx([weight for _, weight in pieces])
    assert has_syntax(text) == (pieces != ((text, 1.0),))


def test_a_weight_moves_the_weighted_words_states_and_no_others(sd):
    """compel's rule: a token of weight w gets empty + (state - empty) * w; every other token keeps its state bit for
    bit, which is also the state the unweighted path (A1111's chunks) gives it."""
    import torch

    pipe = sd.pipe
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    weighted = clip_weights.encode(encoder, tokenizer, ["a (red:1.5) circle"], 1)[0]
    plain = clip_weights.encode(encoder, tokenizer, ["a red circle"], 1)[0]
    before = clip_chunks.encode(encoder, tokenizer, ["a red circle"], 1)[0][0]
    empty = clip_chunks.encode(encoder, tokenizer, [""], 1)[0][0]
    ids = clip_weights.rows(tokenizer, "a (red:1.5) circle", 1)[0]
    red = tokenizer("red", add_special_tokens=False).input_ids
    assert len(red) == 1
    where = (ids == red[0]).nonzero().flatten().tolist()
    assert len(where) == 1
    others = [k for k in range(ids.numel()) if k not in where]
    assert torch.equal(plain, before)  # weights of 1: the unweighted states exactly
    assert torch.equal(weighted[others], plain[others])  # nowhere else
    expected = empty[where] + (plain[where] - empty[where]) * 1.5
    assert torch.allclose(weighted[where], expected, atol=1e-6) and not torch.allclose(weighted[where], plain[where])
    down = clip_weights.encode(encoder, tokenizer, ["a [red] circle"], 1)[0]
    assert torch.equal(down[others], plain[others])
    assert torch.allclose(down[where], empty[where] + (plain[where] - empty[where]) / 1.1, atol=1e-6)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_a_prompt_without_the_syntax_is_read_as_before(request, which):
    """Same pixels as the plain path (the code path of every prompt before weights existed), and no new record key."""
    pipeline = request.getfixturevalue(which)
    specs = [PromptSpec(text, negative_prompt=negative, seed=k) for k, (text, negative) in
             enumerate(zip(PLAIN, ["", "blurry", "", "a green square"]))]
    config = GenerationConfig(num_inference_steps=2, batch_size=2)
    # the same jobs, so the same engine path as a prompt took before weights existed (prompt_syntax None)
    assert pipeline.plan(specs, config) == pipeline.plan(specs, GenerationConfig(num_inference_steps=2,
                                                                                  prompt_syntax="plain"))
    assert all(job.prompt_syntax is None for job in pipeline.plan(specs, config))
    read = pipeline.generate(specs, config)
    plain = pipeline.generate(specs, config, prompt_syntax="plain")
    assert all(np.array_equal(a, b) for a, b in zip(pixels(read), pixels(plain)))
    assert all("prompt_syntax" not in record for record in read.metadata + plain.metadata)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_a_weight_changes_the_image_and_is_recorded(request, which):
    pipeline = request.getfixturevalue(which)
    config = GenerationConfig(num_inference_steps=2, seed=3)
    weighted = pipeline.generate(["a (red:1.6) circle"], config)
    plain = pipeline.generate(["a red circle"], config)
    as_text = pipeline.generate(["a (red:1.6) circle"], config, prompt_syntax="plain")
    assert not np.array_equal(pixels(weighted)[0], pixels(plain)[0])
    assert not np.array_equal(pixels(weighted)[0], pixels(as_text)[0])
    assert weighted.metadata[0]["prompt_syntax"] == "a1111" and as_text.metadata[0]["prompt_syntax"] == "plain"


def test_weights_in_the_negative_prompt_count_too(sd):
    config = GenerationConfig(num_inference_steps=2, seed=3)
    weighted = sd.generate([PromptSpec("a red circle", negative_prompt="(blue:1.8)")], config)
    plain = sd.generate([PromptSpec("a red circle", negative_prompt="blue")], config)
    assert weighted.metadata[0]["prompt_syntax"] == "a1111"
    assert not np.array_equal(pixels(weighted)[0], pixels(plain)[0])


def test_escaped_brackets_are_the_characters(sd):
    config = GenerationConfig(num_inference_steps=2, seed=4)
    escaped = sd.generate([r"a \(red\) circle"], config)
    literal = sd.generate(["a (red) circle"], config, prompt_syntax="plain")
    assert np.array_equal(pixels(escaped)[0], pixels(literal)[0])


def test_break_starts_a_new_chunk(sd):
    tokenizer = clip_tokenizer()
    assert len(clip_weights.split(tokenizer, "a red circle BREAK a blue square")) == 2
    assert len(clip_weights.split(tokenizer, "a red circle, a blue square")) == 1
    result = sd.generate(["a red circle BREAK a blue square"], GenerationConfig(num_inference_steps=2, seed=1))
    assert result.metadata[0]["prompt_chunks"] == 2


def test_weighted_pixels_do_not_depend_on_batch_mates(sd):
    specs = [PromptSpec("a (red:1.4) circle", seed=1), PromptSpec("a [blue] square BREAK left", seed=2),
             PromptSpec("a green triangle", seed=3), PromptSpec("(yellow) circles", seed=4)]
    config = GenerationConfig(num_inference_steps=2, batch_size=4)
    together = pixels(sd.generate(specs, config))
    alone = [pixels(sd.generate([spec], config))[0] for spec in specs]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))


def test_replay_makes_a_weighted_image_again(tiny_sd, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["generate", "a (red:1.5) circle", "--model", str(tiny_sd), "--steps", "2", "--seed",
                                  "2", "--out", str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    image = out / record["file"]
    assert read_record(image)["prompt_syntax"] == "a1111"
    replayed = runner.invoke(main, ["replay", str(image)])
    assert replayed.exit_code == 0 and "identical to the original" in replayed.stderr


def test_a_family_that_takes_no_weights_says_so_in_one_line(tiny_mini, tmp_path):
    """genkit-mini reads prompts with MiniLM, whose pipeline takes text, not weighted states."""
    pipeline = genkit.load(str(tiny_mini), device="cpu")
    with pytest.raises(GenkitError) as info:
        pipeline.plan(["a (red:1.3) circle"], GenerationConfig(seed=1))
    assert "genkit-mini models cannot read" in str(info.value) and "prompt_syntax plain" in str(info.value)
    pipeline.plan(["a (red:1.3) circle"], GenerationConfig(seed=1, prompt_syntax="plain"))  # brackets as text
    pipeline.plan(["a red circle"], GenerationConfig(seed=1))  # no syntax: nothing to refuse
    result = CliRunner().invoke(main, ["generate", "a (red:1.3) circle", "--model", str(tiny_mini), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and "--prompt-syntax plain" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_bad_syntax_name_is_one_line(sd):
    with pytest.raises(GenkitError, match="must be a1111 or plain, got 'comfy'") as info:
        sd.plan(["a red circle"], GenerationConfig(prompt_syntax="comfy"))
    assert info.value.param == "prompt_syntax"
