"""Editing through genkit's engine, CLI and records, on every family's tiny model.

img2img, inpainting and outpainting run through `Pipeline.generate` (the family's diffusers pipeline
made with `from_pipe`, or genkit-mini's own); these tests check what the engine promises for them:
pixels independent of the batch, the known region equal to the input, records that name and hash
every input, replay that finds and checks the input, and one-line errors for bad input.
"""

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import genkit
from genkit import families
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.generate import GenerationConfig
from genkit.outputs import parse_infotext, read_record
from genkit.prompts import PromptSpec
from genkit.testing import FAMILIES, TINY_SIZE, build_tiny

TASKS = {"img2img": "img2img", "inpaint": "inpaint", "outpaint": "inpaint"}  # edit -> the pipeline it runs on
EDITS = [(name, task) for name in FAMILIES for task, needs in TASKS.items() if needs in families.get(name).edit_tasks]
NO_EDITS = [(name, task) for name in FAMILIES for task, needs in TASKS.items()
            if needs not in families.get(name).edit_tasks]
PROMPTS = ["a red circle on the left", "a blue square", "a green triangle at the top"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One loaded tiny model per family, built on first use."""
    root, loaded = tmp_path_factory.mktemp("edit-models"), {}

    def get(family):
        if family not in loaded:
            loaded[family] = genkit.load(str(build_tiny(family, root / family, seed=0)), device="cpu")
        return loaded[family]

    return get


def noise_image(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def half_mask(size):
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 2, 0, size[0], size[1]))
    return mask


def edit_settings(task, size, k):
    """The edit arguments of prompt k: its own input image (and mask), so a batch mixes inputs."""
    image = noise_image(k, size)
    if task == "img2img":
        return dict(image=image, strength=0.6)
    if task == "inpaint":
        return dict(image=image, mask=half_mask(size))
    return dict(image=image, outpaint="right=8,top=8")


@pytest.mark.parametrize("family,task", EDITS)
def test_batch_of_mixed_inputs_equals_each_alone(models, family, task):
    model = models(family)
    size = TINY_SIZE[family][::-1]
    specs = [PromptSpec(p, seed=10 + k, **edit_settings(task, size, k)) for k, p in enumerate(PROMPTS)]
    together = model.generate(specs, GenerationConfig(num_inference_steps=3, batch_size=3))
    alone = [model.generate([spec], GenerationConfig(num_inference_steps=3, batch_size=1)).images[0] for spec in specs]
    for k, spec in enumerate(specs):
        got = np.asarray(together.images[k])
        np.testing.assert_array_equal(got, np.asarray(alone[k]), err_msg=f"{family} {task} image {k}")
        record = together.metadata[k]
        assert record["image"] == "<PIL image>" and len(record["image_sha256"]) == 64
        if task == "img2img":
            assert got.shape[:2] == size[::-1] and record["strength"] == 0.6
        elif task == "inpaint":  # the known (black) half is the input's pixels, on latent families too
            keep = np.asarray(spec.mask) < 128
            np.testing.assert_array_equal(got[keep], np.asarray(spec.image)[keep])
            assert record["strength"] == 1.0 and len(record["mask_sha256"]) == 64
        else:  # outpainting: a canvas 8 wider and 8 taller, the original in its bottom-left corner unchanged
            assert got.shape[:2] == (size[1] + 8, size[0] + 8) and record["outpaint"] == "right=8,top=8"
            np.testing.assert_array_equal(got[8:, :size[0]], np.asarray(spec.image))


def test_genkit_mini_strength_one_is_text_to_image_within_a_level(models):
    """At strength 1 genkit-mini starts at the first timestep, x = alpha x0 + sigma noise with alpha near 0 (not 0):
    measured at most 1 level from text-to-image. Latent families' pipelines draw the VAE's latent sample from the
    image's generator before its noise, so their strength-1 noise (and image) differs from text-to-image."""
    model = models("genkit-mini")
    height, width = TINY_SIZE["genkit-mini"]
    image = noise_image(0, (width, height))
    plain = model.generate(PROMPTS, GenerationConfig(seed=3, num_inference_steps=6, width=width, height=height)).images
    edited = model.generate(PROMPTS, GenerationConfig(seed=3, num_inference_steps=6, image=image, strength=1.0)).images
    for a, b in zip(plain, edited):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


@pytest.mark.parametrize("family,task", NO_EDITS)
def test_families_without_an_edit_say_which_have_it(models, family, task):
    model = models(family)
    size = TINY_SIZE[family][::-1]
    have = ", ".join(f.name for f in families.all_families() if TASKS[task] in f.edit_tasks)
    what = {"img2img": "image-to-image", "inpaint": "inpainting", "outpaint": "inpainting"}[task]
    with pytest.raises(GenkitError, match=f"{what}.*families with it: {have}\\)"):
        model.plan(["a red circle"], GenerationConfig(**edit_settings(task, size, 0)))


# --- the CLI: options, records, replay, bad input -------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory, models):
    """A folder holding a tiny genkit-mini, an input image and masks."""
    folder = tmp_path_factory.mktemp("scene")
    size = TINY_SIZE["genkit-mini"][::-1]
    noise_image(1, size).save(folder / "in.png")
    half_mask(size).save(folder / "mask.png")
    Image.new("L", size, 0).save(folder / "black.png")
    Image.new("L", size, 255).save(folder / "white.png")
    half_mask((size[0] * 2, size[1])).save(folder / "wide-mask.png")
    (folder / "notes.png").write_text("not an image")
    model_dir = folder / "model"
    build_tiny("genkit-mini", model_dir, seed=0)
    return folder


def cli(args, folder):
    return CliRunner().invoke(main, ["generate", "-q", "--model", str(folder / "model"), "--steps", "4", *args],
                              catch_exceptions=False)


def test_cli_img2img_records_and_replays(scene, monkeypatch):
    monkeypatch.chdir(scene)
    result = cli(["a blue circle", "--image", "in.png", "--strength", "0.5", "-s", "7", "-o", "out"], scene)
    assert result.exit_code == 0, result.output
    made = scene / result.output.strip()
    record = read_record(made)
    assert record["image"] == "in.png" and record["strength"] == 0.5
    assert record["image_sha256"] == hashlib.sha256((scene / "in.png").read_bytes()).hexdigest()
    infotext = parse_infotext(Image.open(made).text["parameters"])
    assert infotext["Denoising strength"] == "0.5" and "Mask blur" not in infotext
    manifest = [json.loads(line) for line in (scene / "out" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["image_sha256"] == record["image_sha256"]

    replayed = CliRunner().invoke(main, ["replay", str(made)])
    assert replayed.exit_code == 0 and "identical" in replayed.stderr, replayed.output
    # the input moved: replay says where it looked and how to pass it; --image finds it and checks its hash
    (scene / "in.png").rename(scene / "moved.png")
    try:
        lost = CliRunner().invoke(main, ["replay", str(made)])
        assert lost.exit_code == 2 and "read from in.png, not found; pass it with --image" in lost.stderr
        found = CliRunner().invoke(main, ["replay", str(made), "--image", "moved.png"])
        assert found.exit_code == 0 and "identical" in found.stderr, found.output
        wrong = CliRunner().invoke(main, ["replay", str(made), "--image", "mask.png"])
        assert wrong.exit_code == 2 and "is not the one this image was made from" in wrong.stderr
    finally:
        (scene / "moved.png").rename(scene / "in.png")


def test_cli_inpaint_and_outpaint_records(scene, monkeypatch):
    monkeypatch.chdir(scene)
    result = cli(["a red circle", "--image", "in.png", "--mask", "mask.png", "-s", "3", "-o", "inpaint"], scene)
    assert result.exit_code == 0, result.output
    made = scene / result.output.strip()
    record = read_record(made)
    assert record["mask"] == "mask.png" and record["strength"] == 1.0
    assert parse_infotext(Image.open(made).text["parameters"])["Mask blur"] == "0"
    keep = np.asarray(Image.open("mask.png")) < 128
    np.testing.assert_array_equal(np.asarray(Image.open(made))[keep], np.asarray(Image.open("in.png"))[keep])

    result = cli(["a red circle", "--image", "in.png", "--outpaint", "left=8", "-s", "3", "-o", "outpaint"], scene)
    assert result.exit_code == 0, result.output
    made = scene / result.output.strip()
    assert Image.open(made).size == (TINY_SIZE["genkit-mini"][1] + 8, TINY_SIZE["genkit-mini"][0])
    assert read_record(made)["outpaint"] == "left=8"
    replayed = CliRunner().invoke(main, ["replay", str(made)])
    assert replayed.exit_code == 0 and "identical" in replayed.stderr, replayed.output


def test_jsonl_lines_carry_their_own_inputs(scene, monkeypatch):
    """`image` / `mask` in a .jsonl are relative to the file's folder; `strength` per line."""
    monkeypatch.chdir(scene.parent)
    lines = [{"prompt": "a red circle", "image": "in.png", "strength": 0.4, "seed": 1},
             {"prompt": "a blue square", "image": "in.png", "mask": "mask.png", "seed": 2},
             {"prompt": "a green star", "seed": 3}]
    (scene / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    result = cli(["-f", str(scene / "prompts.jsonl"), "-o", str(scene / "jsonl"), "--json"], scene)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("strength") for r in records] == [0.4, 1.0, None]
    assert records[1]["mask"] == str(scene / "mask.png") and "image" not in records[2]


BAD = [  # (arguments after the prompt, what the one line must say)
    (["--image", "in.png", "--strength", "0"], "strength must be a number in (0, 1], got 0.0"),
    (["--image", "in.png", "--strength", "1.5"], "strength must be a number in (0, 1], got 1.5"),
    (["--image", "in.png", "--strength", "nan"], "strength must be a number in (0, 1], got nan"),
    (["--image", "in.png", "--strength", "0.1"], "strength 0.1 with 4 steps leaves no denoising step"),
    (["--image", "missing.png"], "image file missing.png does not exist"),
    (["--image", "notes.png"], "cannot read image notes.png"),
    (["--image", "in.png", "--mask", "wide-mask.png"], "mask wide-mask.png is 64x32 but the image is 32x32"),
    (["--image", "in.png", "--mask", "black.png"], "mask black.png is all black: nothing to repaint"),
    (["--image", "in.png", "--mask", "white.png"], "mask white.png is all white"),
    (["--image", "in.png", "--mask", "notes.png"], "cannot read image notes.png"),
    (["--mask", "mask.png"], "mask needs an input image to edit (pass --image"),
    (["--strength", "0.5"], "strength 0.5 applies only to an input image"),
    (["--outpaint", "right=8"], "outpaint needs an input image to edit"),
    (["--image", "in.png", "--outpaint", "right=8", "--mask", "mask.png"], "pass --mask or --outpaint, not both"),
    (["--image", "in.png", "--outpaint", "right=x"], "'right=x' is not SIDE=PIXELS"),
    (["--image", "in.png", "--outpaint", "middle=8"], "unknown side 'middle'"),
    (["--image", "in.png", "--outpaint", "right=0"], "adds nothing"),
    (["--image", "in.png", "--width", "13"], "got 13 (try 12 or 14)"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_edit_input_is_one_line_and_writes_nothing(scene, monkeypatch, args, message):
    monkeypatch.chdir(scene)
    result = CliRunner().invoke(main, ["generate", "a red circle", "-q", "--model", str(scene / "model"),
                                       "--steps", "4", "-o", "bad", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.stderr
    assert not (scene / "bad").exists()


def test_cli_refuses_an_edit_for_a_family_without_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_tiny("pixart-sigma", tmp_path / "pixart", seed=0)
    noise_image(0, TINY_SIZE["pixart-sigma"][::-1]).save("in.png")
    result = CliRunner().invoke(main, ["generate", "a red circle", "-q", "--model", "pixart", "--image", "in.png",
                                       "-o", "out"])
    assert result.exit_code == 2 and "PixArt-Sigma models have no img2img pipeline" in result.stderr
    have = ", ".join(f.name for f in families.all_families() if "img2img" in f.edit_tasks)
    assert f"families with it: {have})" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow  # a real process or the real model: the full suite (.ci/run) runs it
def test_edit_loop_example_runs_and_its_images_replay(tmp_path):
    """examples/edit_loop.py on the shipped genkit-mini: four images, each step's input recorded; the last replays."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "edit_loop.py"
    done = subprocess.run([sys.executable, str(example), str(tmp_path / "loop")], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "loop").glob("[0-9]-*.png"))
    assert names == ["0-generate.png", "1-inpaint.png", "2-img2img.png", "3-outpaint.png"]
    last = read_record(tmp_path / "loop" / "3-outpaint.png")
    assert last["outpaint"] == "bottom=16" and last["image"].endswith("2-img2img.png")
    assert Image.open(tmp_path / "loop" / "3-outpaint.png").size == (32, 48)
    replayed = CliRunner().invoke(main, ["replay", str(tmp_path / "loop" / "1-inpaint.png"), "-o", str(tmp_path / "r")])
    assert replayed.exit_code == 0 and "identical" in replayed.stderr, replayed.output


def test_an_in_memory_input_replays_from_a_file_saved_from_it(tmp_path, models):
    """A library caller passes a PIL image; the record hashes its pixels, and replay accepts a file holding them."""
    from genkit.outputs import save_png

    model = models("genkit-mini")
    size = TINY_SIZE["genkit-mini"][::-1]
    image = noise_image(5, size)
    result = model.generate(["a red circle"], GenerationConfig(seed=2, num_inference_steps=4, image=image, strength=0.5))
    save_png(result.images[0], tmp_path / "made.png", result.metadata[0])
    image.save(tmp_path / "input.png")
    noise_image(6, size).save(tmp_path / "other.png")
    assert CliRunner().invoke(main, ["replay", str(tmp_path / "made.png")]).exit_code == 2  # "given in memory"
    ok = CliRunner().invoke(main, ["replay", str(tmp_path / "made.png"), "--image", str(tmp_path / "input.png")])
    assert ok.exit_code == 0 and "identical" in ok.stderr, ok.output
    wrong = CliRunner().invoke(main, ["replay", str(tmp_path / "made.png"), "--image", str(tmp_path / "other.png")])
    assert wrong.exit_code == 2 and "is not the one this image was made from" in wrong.stderr


def test_progress_counts_the_steps_an_edit_runs(models):
    model = models("genkit-mini")
    image = noise_image(0, TINY_SIZE["genkit-mini"][::-1])
    seen = []
    model.generate(["a red circle"], GenerationConfig(seed=1, num_inference_steps=10, image=image, strength=0.5),
                   callback=seen.append)
    assert [(info["step"], info["steps"]) for info in seen] == [(k, 5) for k in range(1, 6)]
