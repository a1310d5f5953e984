"""One declaration of the per-image settings (genkit.settings) and one record schema (genkit.outputs.RECORD): the
dataclasses that hold settings have exactly the table's fields, and what lists settings is read off the tables."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

import genkit
from genkit import checks, images, outputs, prompts, settings
from genkit.errors import GenkitError
from genkit.generate import GenerationConfig, Job
from genkit.prompts import PromptSpec, read_prompts_file
from genkit.run import GenerateRequest


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_dataclasses_hold_exactly_the_tables_settings():
    from genkit.serve.service import Order

    assert fields(GenerationConfig) == set(settings.names(per_call=True))
    assert fields(PromptSpec) == set(settings.names(per_prompt=True))
    assert fields(Job) == {"index", *settings.names(recorded=True)}
    assert fields(Order) == {*settings.names(per_prompt=True), "model", "lora", "fields"}
    assert fields(GenerateRequest) >= set(settings.names(per_call=True))  # its config() copies them by name


def test_each_name_is_declared_once_and_aliases_are_not_names():
    names = [s.name for s in settings.SETTINGS]
    aliases = [s.alias for s in settings.SETTINGS if s.alias]
    assert len(set(names)) == len(names) and len(set(aliases)) == len(aliases)
    assert not set(aliases) & set(names)
    assert {s.alias: s.name for s in settings.SETTINGS if s.alias} == {
        "steps": "num_inference_steps", "guidance": "guidance_scale", "n": "num_images_per_prompt"}


def test_a_jsonl_lines_keys_come_from_the_table():
    assert list(prompts.JSONL_KEYS) == ["prompt", "negative_prompt", "seed", "n", "steps", "guidance", "width", "height",
                                        "scheduler", "prompt_syntax", "hires_scale", "hires_strength", "hires_steps",
                                        "hires_upscaler", "control", "image", "strength", "mask", "outpaint",
                                        "image_sha256", "mask_sha256"]
    assert prompts.JSONL_KEYS["guidance"] == (int, float) and prompts.JSONL_KEYS["outpaint"] == (str, dict)


def test_a_line_in_short_words_and_in_the_librarys_words_is_the_same_prompt(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "in.png")
    short = {"prompt": "a red circle", "n": 2, "steps": 3, "guidance": 5, "seed": 7, "width": 16, "height": 24,
             "scheduler": "euler", "negative_prompt": "blue", "image": "in.png", "strength": 0.5}
    long = {"prompt": "a red circle", "num_images_per_prompt": 2, "num_inference_steps": 3, "guidance_scale": 5,
            "seed": 7, "width": 16, "height": 24, "scheduler": "euler", "negative_prompt": "blue", "image": "in.png",
            "strength": 0.5, "model": "any", "device": "cpu", "file": "00000-7-a-red-circle.png"}
    (tmp_path / "p.jsonl").write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    first, second = read_prompts_file(tmp_path / "p.jsonl")
    assert first == second == PromptSpec(
        "a red circle", negative_prompt="blue", seed=7, num_images_per_prompt=2, num_inference_steps=3,
        guidance_scale=5.0, width=16, height=24, scheduler="euler", image=str(tmp_path / "in.png"), strength=0.5)
    assert isinstance(first.guidance_scale, float)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x", "guidance_scale": 2, "guidance": 3}, "'guidance_scale' and 'guidance' say the same thing"),
    ({"prompt": "x", "n": 2, "num_images_per_prompt": 2}, "'num_images_per_prompt' and 'n' say the same thing"),
    ({"prompt": "x", "num_inference_steps": 0}, "line 1: steps must be at least 1, got 0"),
    ({"prompt": "x", "guidance_scale": "high"}, "line 1: guidance has the wrong type ('high')"),
    ({"prompt": "x", "batch_size": 2}, "line 1: unknown key 'batch_size' (valid: prompt, negative_prompt, seed, n,"),
], ids=["guidance-twice", "n-twice", "record-word-checked", "record-word-typed", "not-per-prompt"])
def test_a_lines_mistakes_name_the_short_word(tmp_path, line, message):
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(GenkitError) as info:
        read_prompts_file(tmp_path / "p.jsonl")
    assert message in str(info.value)


# --- the record's schema ---------------------------------------------------------------------------------------------


def test_the_record_schema_keeps_every_key_earlier_records_hold():
    """A manifest written before keeps being read: what is run context (left to the command line) and what replay
    requires are what they were."""
    assert outputs.RECORD_ONLY == {"index", "file", "skipped", "model", "family", "lora", "attention", "dtype",
                                   "device", "exact", "threads", "versions", "compiled", "prompt_truncated",
                                   "prompt_chunks", "prompt_unknown_words", "vae_upcast", "memory_plan",
                                   "quantization"}
    required = {key.name: key.required for key in outputs.RECORD if key.required}
    assert list(required) == ["index", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
                              "width", "height", "scheduler", "model", "lora"]
    assert outputs.RECORD_SETTINGS == settings.names(recorded=True)
    assert set(outputs.ENVIRONMENT) == {"threads", "device", "dtype", "compiled", "exact", "attention", "versions",
                                        "vae_upcast", "memory_plan", "quantization"}
    names = [key.name for key in outputs.RECORD]
    assert len(set(names)) == len(names)


@pytest.fixture(scope="module")
def mini(tiny_mini):
    return genkit.load(str(tiny_mini), device="cpu")


def test_what_the_engine_records_is_the_schema(mini, tmp_path):
    """Pipeline.record writes the schema's keys: every recorded setting of a text-to-image job, and an edit's where
    it has them, each input with its sha256."""
    schema = {key.name for key in outputs.RECORD}
    plain = mini.record(mini.plan(["a red circle"], GenerationConfig(seed=1, num_inference_steps=2))[0])
    assert set(plain) <= schema
    assert [key for key in plain if key in outputs.RECORD_SETTINGS] == list(settings.names(recorded=True, edit=False,
                                                                                           optional=False))
    assert {key for key in plain if key not in outputs.RECORD_SETTINGS} == \
        {"index", "model", "family", "lora", "attention", "dtype", "device", "exact", "threads", "versions",
         "memory_plan"}

    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))
    masked = mini.record(mini.plan(["a red square"], GenerationConfig(seed=1, num_inference_steps=2, image=source,
                                                                      mask=mask))[0])
    grown = mini.record(mini.plan(["a red square"], GenerationConfig(seed=1, num_inference_steps=2, image=source,
                                                                     outpaint="right=8"))[0])
    assert set(masked) <= schema and set(grown) <= schema
    assert [k for k in masked if k not in plain] == ["image", "image_sha256", "strength", "mask", "mask_sha256"]
    assert [k for k in grown if k not in plain] == ["image", "image_sha256", "strength", "outpaint"]
    assert masked["strength"] == 1.0 and grown["outpaint"] == "right=8" and len(masked["mask_sha256"]) == 64


# --- the words of each front end --------------------------------------------------------------------------------------


def test_each_dialect_maps_the_librarys_words_to_its_own():
    """Keys are the library's words (a setting, or an order's model and LoRAs); a map says only where they differ."""
    from genkit.serve import a1111, gallery, openai

    library = {*settings.names(), "model", "lora"}
    for words in (a1111.FIELDS, openai.FIELDS, gallery.FIELDS):
        assert set(words) <= library and all(words[key] != key for key in words)
    assert (a1111.FIELDS["num_inference_steps"], a1111.FIELDS["guidance_scale"]) == ("steps", "cfg_scale")
    assert (openai.FIELDS["num_images_per_prompt"], openai.FIELDS["width"]) == ("n", "size")


def test_the_gallery_shows_a_record_in_its_own_words():
    from genkit.serve.gallery import _entry
    from genkit.serve.store import Entry

    record = {"index": 0, "prompt": "a red circle", "negative_prompt": "", "seed": 3, "num_inference_steps": 4,
              "guidance_scale": 2.0, "width": 16, "height": 24, "scheduler": "euler", "model": "m",
              "lora": [{"name": "star", "path": "/x", "scale": 0.5}], "versions": {"genkit": "0"}}
    shown = _entry(Entry("00000-3-a-red-circle.png", record, 1.0))
    assert {key: shown[key] for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height",
                                        "scheduler", "model", "loras")} == {
        "prompt": "a red circle", "negative_prompt": "", "seed": 3, "steps": 4, "guidance": 2.0, "width": 16,
        "height": 24, "scheduler": "euler", "model": "m", "loras": [{"name": "star", "scale": 0.5}]}


# --- the checks -------------------------------------------------------------------------------------------------------


def test_the_checks_live_in_one_module():
    """genkit.checks holds them; the modules they came from keep no copies or re-exports."""
    moved = ("check_steps", "check_guidance", "check_side", "check_count", "check_seed", "max_steps", "max_side",
             "MAX_SEED", "MAX_GUIDANCE", "DEFAULT_MAX_STEPS", "DEFAULT_MAX_SIDE")
    for name in moved:
        assert hasattr(checks, name) and not hasattr(prompts, name), name
    assert hasattr(checks, "check_multiple") and not hasattr(images, "check_multiple")
    with pytest.raises(GenkitError) as info:
        checks.check_multiple("width", 20, 8)
    assert info.value.param == "width" and str(info.value) == "width must be a positive multiple of 8, got 20 (try 16 " \
                                                               "or 24)"
