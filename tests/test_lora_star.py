"""examples/lora_star.py: data, training on the defaults, and the judged grids, end to end on a tiny model.

The figures need the real genkit-mini and minutes of training (benchmarks/lora_concepts.py); here a
tiny random model and a few steps check that every piece is wired."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from genkit.data import shapes
from genkit.eval.judge import judge

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.device=cpu", "train.threads=1", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
        "prior.images=6"]


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


def test_the_example_is_the_defaults(example):
    """No recipe of its own: the example trains as `genkit train lora DATA --out OUT` does."""
    import inspect

    source = inspect.getsource(example.train)
    assert "genkit.train_lora(data, out, model=model, overrides=overrides, progress=progress)" in source
    assert "config" not in source and not (REPO / "configs" / "lora-star.toml").exists()


def test_example_end_to_end_on_a_tiny_model(example, tiny_mini, tmp_path):
    data, out = tmp_path / "data", tmp_path / "lora"
    example.make_data(data)
    images = sorted(data.glob("*.png"))
    assert len(images) == 32
    colors = set()
    for path in images:  # every training image is one star of a training colour, captioned with the trigger word
        caption = path.with_suffix(".txt").read_text()
        assert re.search(r"\bsks star\b", caption), caption
        found = judge(Image.open(path))
        assert found.count == 1 and found.objects[0].shape == "star" and found.objects[0].color in caption
        colors.add(found.objects[0].color)
    assert colors == {"red", "blue"}
    assert example.train(data, out, model=str(tiny_mini), overrides=FAST, progress=False) > 0
    record = json.loads((out / "genkit_lora.json").read_text())
    assert record["prior"] == {"source": "render", "images": 6, "fraction": 0.25, "folder": "priors"}
    assert record["trigger_words"] == ["sks"] and record["recipe"]["lora"]["target_modules"][-1] == "conv2"
    assert example.train(data, out, model=str(tiny_mini), overrides=FAST) is None  # reused
    result = example.star_images(out, model=str(tiny_mini), per_color=1, settings={"num_inference_steps": 2})
    assert [r["color"] for r in result["rows"]] == list(shapes.COLORS)
    assert result["figures"]["seen_colors"]["n"] == 2 and result["figures"]["unseen_colors"]["n"] == 4
    example.save_grid(result, tmp_path / "grid.png", per_color=1)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width == 96 and grid.height > 6 * 96  # a row per colour
