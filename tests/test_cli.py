"""`genkit generate`, `replay`, `info` through click's CliRunner and, for crash safety, a real process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from genkit.cli import main
from genkit.outputs import parse_infotext

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def generate(model, out, *args):
    return run("generate", *args, "--model", model, "--out", out, "--steps", 2, "--quiet")


def images(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png")) if p.name != "grid.png"}


def test_batches_equal_singles_with_metadata_and_manifest(tiny_sd, tmp_path):
    a = generate(tiny_sd, tmp_path / "b4", "a", "b", "-n", 3, "--batch-size", 4, "--seed", 11)
    b = generate(tiny_sd, tmp_path / "b1", "a", "b", "-n", 3, "--batch-size", 1, "--seed", 11)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    four, one = images(tmp_path / "b4"), images(tmp_path / "b1")
    assert len(four) == 6 and four.keys() == one.keys()
    assert all(np.array_equal(four[name], one[name]) for name in four)
    assert a.stdout.split() == [str(tmp_path / "b4" / name) for name in sorted(four)]
    manifest = (tmp_path / "b4" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 6 and [json.loads(line)["seed"] for line in manifest] == list(range(11, 17))
    for path in sorted((tmp_path / "b4").glob("*.png")):
        chunks = Image.open(path).text
        assert {"parameters", "genkit"} <= set(chunks)


def test_parameters_chunk_round_trip(tiny_sd, tmp_path):
    result = generate(tiny_sd, tmp_path, "a red circle, on the left", "--negative", "blue", "--seed", 5,
                      "--guidance", 3.5, "--scheduler", "euler-a", "--width", 48, "--height", 32)
    assert result.exit_code == 0, result.output
    path = next(tmp_path.glob("*.png"))
    parsed = parse_infotext(Image.open(path).text["parameters"])
    record = json.loads(Image.open(path).text["genkit"])
    assert parsed["prompt"] == "a red circle, on the left" and parsed["negative_prompt"] == "blue"
    assert parsed["Steps"] == "2" and parsed["Seed"] == "5" and parsed["CFG scale"] == "3.5"
    assert parsed["Sampler"] == "Euler a" and parsed["Size"] == "48x32" and parsed["Model"] == str(tiny_sd)
    assert record["seed"] == 5 and record["scheduler"] == "euler-a" and Image.open(path).size == (48, 32)


def test_json_output_and_prompts_files(tiny_sd, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\n\na red circle\n  \na blue square\n")
    result = generate(tiny_sd, tmp_path / "txt", "--prompts-file", text, "--json", "--seed", 1)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "a blue square"]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "one", "seed": 100, "n": 2}\n{"prompt": "two", "negative_prompt": "x", "steps": 3, '
                     '"guidance": 2}\n')
    result = generate(tiny_sd, tmp_path / "jsonl", "--prompts-file", lines, "--json", "--seed", 1)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [("one", 100), ("one", 101), ("two", 3)]
    assert records[2]["num_inference_steps"] == 3 and records[2]["guidance_scale"] == 2.0
    assert records[2]["negative_prompt"] == "x"


def test_rerun_writes_only_missing_images(tiny_sd, tmp_path):
    args = ("a", "b", "-n", 4, "--seed", 3, "--batch-size", 3)
    assert generate(tiny_sd, tmp_path, *args).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    removed = sorted(before)[2:5]
    for name in removed:
        (tmp_path / name).unlink()
    result = generate(tiny_sd, tmp_path, *args, "--json")
    written = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["file"] for r in written if not r.get("skipped")) == removed
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    assert all(after[name] == before[name] for name in before if name not in removed)
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 8
    result = generate(tiny_sd, tmp_path, *args, "--overwrite", "--json")
    assert not any(json.loads(line).get("skipped") for line in result.stdout.splitlines())


@pytest.mark.slow  # a real process or the real model: the full suite (.ci/run) runs it
def test_killed_run_resumes_to_the_same_set(tiny_sd, tmp_path):
    """Kill a 40-image run midway (SIGKILL, a real process); the rerun fills the gaps exactly."""
    command = [sys.executable, "-m", "genkit", "generate", "a red circle", "a blue square", "-n", "20", "--seed", "7",
               "--batch-size", "2", "--steps", "2", "--model", str(tiny_sd), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("*.png"))) < 8 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = images(tmp_path / "killed")
    assert 8 <= len(partial) < 40  # every file under a real name decodes: nothing half-written there
    rerun = subprocess.run(command + ["--out", str(tmp_path / "killed"), "--json"], env=env, capture_output=True,
                           text=True, check=True)
    assert not list((tmp_path / "killed").glob(".*tmp"))  # a temporary the kill left behind is gone too
    written = [json.loads(line) for line in rerun.stdout.splitlines() if not json.loads(line).get("skipped")]
    assert len(written) == 40 - len(partial)
    subprocess.run(command + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    resumed, whole = images(tmp_path / "killed"), images(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and len(whole) == 40
    assert all(np.array_equal(resumed[name], whole[name]) for name in whole)
    assert len((tmp_path / "killed" / "manifest.jsonl").read_text().splitlines()) == 40


def test_rerun_removes_what_a_killed_write_left(tiny_sd, tmp_path):
    """A kill between writing the temporary file and renaming it leaves `.<name>-*.png.tmp` behind."""
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".00000-3-a-red-circle-k1ll3d.png.tmp"
    stale.write_bytes(b"\x89PNG half")
    other = tmp_path / ".00001-4-a-blue-square-abc.png.tmp"  # not this run's image: left alone
    other.write_bytes(b"")
    assert generate(tiny_sd, tmp_path, "a red circle", "--seed", 3).exit_code == 0
    assert not stale.exists() and other.exists() and (tmp_path / "00000-3-a-red-circle.png").is_file()


def test_replay_regenerates_the_same_pixels(tiny_sd, tmp_path):
    assert generate(tiny_sd, tmp_path, "a red circle", "--seed", 9, "--scheduler", "ddim").exit_code == 0
    original = next(tmp_path.glob("*.png"))
    result = run("replay", original, "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert "identical to the original" in result.stderr
    replayed = next((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(replayed)), np.asarray(Image.open(original)))


def test_grid(tiny_sd, tmp_path):
    """The grid holds every image of the run, in index order, each scaled to its cell (nearest neighbour)."""
    assert generate(tiny_sd, tmp_path, "a", "b", "-n", 2, "--seed", 1, "--grid").exit_code == 0
    images = sorted(p for p in tmp_path.glob("*.png") if p.name != "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        grid = np.asarray(grid.convert("RGB"))
    cell = grid.shape[1] // 2  # four images: two columns, two rows of cell + label
    assert len(images) == 4 and grid.shape[1] == 2 * cell and cell >= 96
    for i, path in enumerate(images):
        with Image.open(path) as image:
            want = np.asarray(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST))
        top = (i // 2) * (grid.shape[0] // 2)
        assert np.array_equal(grid[top:top + cell, (i % 2) * cell:(i % 2 + 1) * cell], want), path.name


def test_help_does_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom genkit.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0 and 'generate' in r.output\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_info_and_models():
    import torch

    result = run("info")
    assert result.exit_code == 0 and "attention xformers" in result.stdout and "diffusers" in result.stdout
    assert torch.__version__ in result.stdout  # the versions a record would hold
    assert "genkit-mini" in run("models").stdout


def test_replay_names_the_largest_difference_and_what_changed(tiny_sd, tmp_path):
    """A record made on another thread count, with pixels that differ: the replay says by how much and why."""
    from PIL.PngImagePlugin import PngInfo

    assert generate(tiny_sd, tmp_path, "a red circle", "--seed", 9).exit_code == 0
    original = next(tmp_path.glob("*.png"))
    with Image.open(original) as image:
        record, pixels = json.loads(image.text["genkit"]), np.asarray(image.convert("RGB")).copy()
    pixels[0, 0] = (pixels[0, 0].astype(int) + 3) % 256
    record["threads"] = 99
    info = PngInfo()
    info.add_text("genkit", json.dumps(record))
    Image.fromarray(pixels).save(original, pnginfo=info)
    result = run("replay", original, "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert "differs from the original by up to 3 of 255" in result.stderr
    assert "CPU threads 99 ->" in result.stderr
