"""A run's manifest.jsonl is a prompts file: feeding it back makes the same images (issue #15's one vocabulary)."""

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from genkit.cli import main


def run(args):
    result = CliRunner().invoke(main, ["generate", "-q", *args])
    assert result.exit_code == 0, result.output
    return result


def test_the_manifest_round_trips_as_a_prompts_file(tiny_mini, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save("in.png")
    lines = [{"prompt": "a red circle", "n": 2, "steps": 3, "seed": 5},
             {"prompt": "a blue square", "guidance": 2.5, "negative_prompt": "green", "width": 24, "height": 12},
             {"prompt": "a green triangle", "scheduler": "euler", "steps": 4},
             {"prompt": "a red square", "image": "in.png", "strength": 0.5, "seed": 9}]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    run(["-f", "prompts.jsonl", "--model", str(tiny_mini), "--steps", "2", "-s", "1", "-o", "first"])
    manifest = (tmp_path / "first" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 5 and "num_inference_steps" in json.loads(manifest[0])

    run(["-f", "first/manifest.jsonl", "--model", str(tiny_mini), "-o", "again"])
    first = sorted(p.name for p in (tmp_path / "first").glob("*.png"))
    again = sorted(p.name for p in (tmp_path / "again").glob("*.png"))
    assert first == again and len(first) == 5
    for name in first:
        a, b = Image.open(tmp_path / "first" / name), Image.open(tmp_path / "again" / name)
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b)), name
    records = [json.loads(line) for line in (tmp_path / "again" / "manifest.jsonl").read_text().splitlines()]
    keys = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width", "height",
            "scheduler", "image_sha256", "strength")
    assert [{k: r.get(k) for k in keys} for r in records] == [{k: json.loads(m).get(k) for k in keys} for m in manifest]


def test_a_manifest_line_whose_input_changed_is_refused(tiny_mini, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16), (200, 10, 10)).save("in.png")
    run(["a red square", "--image", "in.png", "--model", str(tiny_mini), "--steps", "2", "-s", "1", "-o", "first"])
    Image.new("RGB", (16, 16), (10, 10, 200)).save("in.png")
    result = CliRunner().invoke(main, ["generate", "-q", "-f", "first/manifest.jsonl", "--model", str(tiny_mini),
                                       "-o", "again"])
    assert result.exit_code == 2 and "manifest.jsonl line 1: image file in.png is not the one recorded" in result.stderr
    assert not (tmp_path / "again").exists()


def test_a_record_and_a_prompts_word_for_the_same_setting_is_one_line(tiny_mini, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a red circle", "steps": 3, "num_inference_steps": 4}))
    result = CliRunner().invoke(main, ["generate", "-q", "-f", str(tmp_path / "p.jsonl"), "--model", str(tiny_mini),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "'num_inference_steps' and 'steps' say the same thing" in result.stderr
