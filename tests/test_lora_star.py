"""examples/lora_star.py (issue 4): its data, training and evaluation plumbing, end to end on a tiny model.

The figures themselves need the real genkit-mini and minutes of training; here a tiny random
model and a few steps check that every piece is wired: captions carry the trigger word, the star
only comes in the training colours, training writes weights, evaluation returns every figure."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genkit.data import shapes
from genkit.eval.judge import judge

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.device=cpu", "train.threads=1", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lora_star_example", REPO / "examples" / "lora_star.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's other core may be busy (see tests/test_lora.py)
    yield
    torch.set_num_threads(before)


def test_dataset_is_stars_in_two_colours_with_the_trigger(example, tmp_path):
    written = example.make_dataset(tmp_path / "star", n=36)
    assert len(written) == 36 and len(list((tmp_path / "star").glob("*.png"))) == 36
    colors, positions, sizes = set(), set(), set()
    for path, caption in written:
        assert path.with_suffix(".txt").read_text().strip() == caption
        assert re.search(rf"\b{example.TRIGGER} star\b", caption), caption
        found = judge(Image.open(path))  # the judge reads every training image as one star of its colour
        assert found.count == 1 and found.objects[0].shape == "star", caption
        colors.add(found.objects[0].color)
        positions.add(found.objects[0].position)
        sizes.add(found.objects[0].size)
        assert found.objects[0].color in caption
    assert colors == set(example.TRAIN_COLORS) == {"red", "blue"}
    assert positions == set(shapes.POSITIONS) and sizes == set(shapes.SIZES)
    captions = [c for _, c in written]  # a few phrasings, with and without a position
    assert any(c.startswith("an image of a") for c in captions) and any(c.startswith("a picture showing") for c in captions)
    assert any(re.fullmatch(r"(red|blue) sks star, .+", c) for c in captions)
    assert any(c.endswith("sks star") for c in captions) and any(c.endswith("right") for c in captions)
    again = example.make_dataset(tmp_path / "again", n=36)  # deterministic
    assert [c for _, c in again] == [c for _, c in written]
    assert np.array_equal(np.asarray(Image.open(again[5][0])), np.asarray(Image.open(written[5][0])))


def test_prior_images_are_base_shapes(example, tiny_mini, tmp_path):
    rendered = example.make_prior(tmp_path / "render", n=8)
    generated = example.make_prior(tmp_path / "model", n=2, model=str(tiny_mini), source="model", batch_size=2,
                                   settings={"num_inference_steps": 2})
    assert [c for _, c in generated] == [c for _, c in rendered[:2]]  # the same captions, either source
    for path, caption in rendered:
        assert path.with_suffix(".txt").read_text().strip() == caption and "star" not in caption
        found = judge(Image.open(path))  # the shapes world's own scenes, read back as what the caption says
        assert all(o.shape in shapes.SHAPES and o.color in caption and o.shape in caption for o in found.objects)
    assert Image.open(generated[0][0]).size == (16, 16)  # the tiny model's own resolution
    with pytest.raises(ValueError, match="render"):
        example.make_prior(tmp_path / "x", n=1, source="photos")


def test_star_prompts_cover_all_colours(example):
    prompts = example.star_prompts(10)
    assert len(prompts) == 60
    assert {p.color for p in prompts} == set(shapes.COLORS)
    assert {p.color for p in prompts if p.seen_color} == set(example.TRAIN_COLORS)
    for p in prompts:
        assert f"{example.TRIGGER} star" in p.prompt and p.color in p.prompt
        assert p.spec.objects[0].shape == "star" and p.spec.objects[0].color == p.color
    assert 20 <= sum(p.spec.objects[0].position is not None for p in prompts) <= 40  # with and without positions
    assert [p.prompt for p in prompts] == [p.prompt for p in example.star_prompts(10)]


def test_star_figures_count_right(example):
    rows = [{"color": c, "seen_color": c in ("red", "blue"), "star_found": f, "star_color": f and k, "all_correct": k}
            for c, f, k in [("red", True, True), ("red", False, False), ("green", True, False), ("green", True, True)]]
    figures = example.star_figures(rows)
    assert figures["overall"] == {"n": 4, "star_found": 0.75, "star_color": 0.5, "all_correct": 0.5}
    assert figures["seen_colors"]["star_found"] == 0.5 and figures["unseen_colors"]["star_found"] == 1.0
    assert list(figures["per_color"]) == ["red", "green"]
    assert example.drop_points({"seen": 0.9, "overall": 0.8}, {"seen": 0.85, "overall": 0.82}) == {"seen": 5.0,
                                                                                                  "overall": -2.0}


def test_example_end_to_end_on_a_tiny_model(example, tiny_mini, tmp_path, capsys):
    out = tmp_path / "lora-star"
    args = ["--out", str(out), "--model", str(tiny_mini), "--images", "6", "--prior", "6", "--per-color", "1",
            "--standard", "2", "1", "1", "2", "--steps", "2", "--batch-size", "4", "--no-progress"]
    args += [a for s in FAST for a in ("--set", s)]
    assert example.main(args) == 0
    printed = capsys.readouterr().out
    # data: stars (repeated to balance the prior images) and prior images of base shapes, all captioned
    stars = sorted((out / "data" / "1_star").glob("*.png"))
    prior = sorted((out / "data" / "prior").glob("*.png"))
    assert len(stars) == 6 and len(prior) == 6
    assert all("sks star" in p.with_suffix(".txt").read_text() for p in stars)
    assert not any("star" in p.with_suffix(".txt").read_text() for p in prior)
    # training: weights and the record, with its measured time
    assert (out / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    record = json.loads((out / "lora" / "genkit_lora.json").read_text())
    assert record["steps"] == 2 and record["items"] == 12
    # evaluation: every figure, the grids, the table
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["steps"] == 2 and results["training"]["seconds"] > 0
    assert results["training"]["star_images"] == 6 and results["training"]["prior_images"] == 6
    star = results["star"]
    for key in ("with_lora", "without_lora"):
        assert star[key]["overall"]["n"] == 6 and star[key]["seen_colors"]["n"] == 2
        assert star[key]["unseen_colors"]["n"] == 4 and set(star[key]["per_color"]) == set(shapes.COLORS)
        for rate in ("star_found", "star_color", "all_correct"):
            assert 0 <= star[key]["overall"][rate] <= 1
    assert len(star["rows_with_lora"]) == 6
    standard = results["standard"]
    assert set(standard["drop_points"]) == {"seen", "held-out", "unseen-phrasing", "two-object", "overall"}
    for group, before in standard["all_correct_without_lora"].items():
        after = standard["all_correct_with_lora"][group]
        assert standard["drop_points"][group] == pytest.approx(100 * (before - after), abs=0.01)
    assert results["settings"]["num_inference_steps"] == 2 and results["settings"]["lora"]
    assert len(results["checks"]) == 4 and all(isinstance(v, bool) for v in results["checks"].values())
    grid = Image.open(out / "star_grid.png")
    assert grid.width == 96 and grid.height > 6 * 96  # a row per colour, one prompt each
    assert (out / "star_grid_base.png").exists() and (out / "table.txt").read_text().strip() in printed
    assert "star found" in printed and "drop (points)" in printed
    # a rerun reuses the LoRA and its recorded training time, and only re-evaluates
    assert example.main(args) == 0
    assert "reusing the LoRA" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["training"] == results["training"]
