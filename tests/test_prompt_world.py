"""genkit-mini says which words of a prompt lie outside its shapes world (once, as a warning) and records them
(`prompt_unknown_words`); prompts of its world stay silent. The world's words come from the caption generator
(genkit.data.shapes.vocabulary); the engine only asks the family (`prompt_notice`)."""

from __future__ import annotations

import random
import warnings

import pytest
from click.testing import CliRunner

import genkit
from genkit.cli import main
from genkit.data import shapes
from genkit.eval.prompts import build_prompts
from genkit.prompts import UnknownWordsWarning

CAT = "a photo of a cat on a sofa"


@pytest.fixture(scope="module")
def mini(tiny_mini):
    return genkit.load(str(tiny_mini), device="cpu")


def told(call) -> list[str]:
    """The UnknownWordsWarnings `call()` gives, as text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, UnknownWordsWarning)]


def world_captions() -> list[str]:
    """Captions the shapes world makes: training scenes (held-out pairs too), every phrasing (the held-out ones in
    every colour, shape, size and position), and the evaluation set."""
    captions = [shapes.random_scene(seed, include_held_out=seed % 2 == 0).caption for seed in range(4000)]
    rng = random.Random(0)
    for template in (*shapes.TRAIN_TEMPLATES, *shapes.HELD_OUT_TEMPLATES):
        for color in shapes.COLORS:
            for shape in shapes.SHAPES:
                captions.append(shapes.single_object_scene(rng, color=color, shape=shape, template=template,
                                                           state_position=True, state_size=True,
                                                           include_held_out=True).caption)
    for relation in shapes.RELATIONS:
        captions += [shapes.two_object_scene(rng, relation=relation).caption for _ in range(50)]
    captions += [item.prompt for item in build_prompts(seed=3)]
    return captions


def test_every_caption_of_its_world_is_silent(mini):
    captions = world_captions()
    assert len(set(captions)) > 2000
    heard = told(lambda: [mini.family.prompt_notice(mini.pipe, caption) for caption in captions])
    assert heard == []
    assert all(mini.family.prompt_notice(mini.pipe, caption) is None for caption in captions)


def test_a_prompt_outside_its_world_is_said_once_and_recorded(mini):
    results = []
    heard = told(lambda: results.append(mini.generate([CAT, "a red circle on the left"], num_images_per_prompt=2,
                                                      num_inference_steps=2, seed=1)))
    assert len(heard) == 1, heard
    assert all(f"'{word}'" in heard[0] for word in ("photo", "cat", "sofa")) and "model" in heard[0]
    records = results[0].metadata
    assert [r.get("prompt_unknown_words") for r in records] == [["photo", "cat", "sofa"]] * 2 + [None] * 2


def test_the_command_line_says_it_once_naming_model(tiny_mini, tmp_path):
    result = CliRunner().invoke(main, ["generate", CAT, "-n", "2", "--model", str(tiny_mini), "--steps", "2", "-q",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "genkit: warning:" in line]
    assert len(lines) == 1 and "'cat'" in lines[0] and "--model" in lines[0], result.stderr


def test_a_model_of_the_open_world_says_nothing(tiny_sd):
    sd = genkit.load(str(tiny_sd), device="cpu")
    assert told(lambda: sd.generate([CAT], num_inference_steps=2, seed=1)) == []
    assert sd.family.prompt_notice(sd.pipe, CAT) is None


def test_with_a_lora_loaded_its_world_may_have_grown(tiny_mini, tmp_path):
    """A LoRA teaches genkit-mini new words (a concept's trigger word): while one is loaded it says nothing."""
    import torch
    from safetensors.torch import save_file

    from genkit import lora

    mini = genkit.load(str(tiny_mini), device="cpu")
    tensors = {}
    for name, module in mini.pipe.unet.named_modules():
        if name.endswith(("to_q", "to_v")) and isinstance(module, torch.nn.Linear):
            tensors[f"unet.{name}.lora.down.weight"] = torch.zeros(2, module.in_features)
            tensors[f"unet.{name}.lora.up.weight"] = torch.zeros(module.out_features, 2)
    save_file(tensors, str(tmp_path / "zqx.safetensors"))
    lora.apply(mini, [lora.parse_spec(str(tmp_path / "zqx.safetensors"))])
    assert told(lambda: mini.family.prompt_notice(mini.pipe, "a red zqx heart")) == []
    mini.family.unload_lora(mini.pipe, "lora0_zqx")
    assert mini.family.prompt_notice(mini.pipe, "a red zqx heart") == ["zqx", "heart"]
