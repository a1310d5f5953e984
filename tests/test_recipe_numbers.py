"""Every number of a training recipe (LoRA and base) is checked against its declared range before anything is
written: `--set key=nan`, `inf` or a value outside the range is one line naming the key, the value and the range,
exit 2, and nothing in --out. The keys come from the recipes' own declarations (genkit.config.number)."""

from __future__ import annotations

import dataclasses
import math
import tomllib

import pytest
from click.testing import CliRunner
from PIL import Image

from genkit.cli import main
from genkit.config import Range
from genkit.train.base import BaseRecipe
from genkit.train.recipe import LoraRecipe


def numbers(recipe_type, where: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(key, field) for every number a recipe declares, sections included."""
    found = []
    for field in dataclasses.fields(recipe_type):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            found += numbers(type(default), f"{where}{field.name}.")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            found.append((f"{where}{field.name}", field))
    return found


def outside(spec: Range) -> str:
    """A value just outside the range, as TOML."""
    if spec.low is not None:
        value = spec.low if spec.low_open else spec.low - 1
    else:
        value = spec.high if spec.high_open else spec.high + 1
    return str(int(value)) if spec.whole else repr(float(value))


def cases(recipe_type, command: str) -> list:
    rows = []
    for key, field in numbers(recipe_type):
        spec = field.metadata.get("range")
        for text in ("nan", "inf", outside(spec) if spec else "0"):
            rows.append(pytest.param(command, key, spec, text, id=f"{command}-{key}={text}"))
    return rows


def test_every_recipe_number_declares_its_range():
    for recipe_type in (LoraRecipe, BaseRecipe):
        keys = numbers(recipe_type)
        assert len(keys) >= 15, keys
        unranged = [key for key, field in keys if not isinstance(field.metadata.get("range"), Range)]
        assert not unranged, f"numbers without a declared range: {unranged}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    Image.new("RGB", (32, 32), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("a photo of sks circle")
    return folder


@pytest.mark.parametrize("command, key, spec, text", cases(LoraRecipe, "lora") + cases(BaseRecipe, "base"))
def test_a_recipe_number_out_of_range_is_one_line_and_writes_nothing(data_dir, tmp_path, command, key, spec, text):
    out = tmp_path / "run"
    args = ["train", "lora", str(data_dir)] if command == "lora" else ["train", "base"]
    result = CliRunner().invoke(main, [*args, "--set", f"{key}={text}", "--out", str(out), "-q"])
    value = tomllib.loads(f"v = {text}")["v"]
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0] == f"Error: {key} must be {spec}, got {value!r}"
    assert not out.exists() or not any(out.iterdir())


def test_the_range_text_and_its_bounds():
    assert str(Range(0, 1, high_open=True)) == "in [0, 1)"
    assert str(Range(1, whole=True)) == "a whole number >= 1"
    assert str(Range(0, low_open=True)) == "a number > 0"
    assert str(Range(1, 1000, whole=True)) == "a whole number in [1, 1000]"
    spec = Range(0, 1, high_open=True)
    assert spec.holds(0) and spec.holds(0.5) and not spec.holds(1) and not spec.holds(math.nan)
    assert not spec.holds(math.inf) and not spec.holds(True) and not Range(1, whole=True).holds(2.0)
