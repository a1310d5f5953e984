"""Training a ControlNet (#28, `genkit train controlnet`, genkit.train.controlnet) on tiny models, and the pieces of
the placement benchmark (genkit.eval.controlnet, benchmarks/controlnet_train.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import genkit
from genkit import testing
from genkit.cli import main
from genkit.controlnet import Control
from genkit.data import shapes
from genkit.eval import controlnet as placement
from genkit.outputs import read_record

pytest.importorskip("cv2")  # canny maps (genkit[controlnet]; in the dev extras)

QUICK = ["train.steps=4", "train.batch_size=4", "train.checkpoint_every=2", "train.warmup_steps=1",
         "validation.every=0"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    placement.make_dataset(folder, n=6)
    return folder


def trained(out: Path) -> dict:
    return load_file(str(out / "diffusion_pytorch_model.safetensors"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_genkit_mini_controlnet_trains_and_steers_through_control(tiny_mini, scenes, tmp_path):
    """The CLI writes a diffusers ControlNet folder and its record; the ControlNet learned (its zero convolutions are
    no longer zero); plain diffusers loads it; `--control model=OUT` runs it, and the image's record names it."""
    from diffusers import ControlNetModel

    out = tmp_path / "cn"
    result = run("train", "controlnet", scenes, "--model", tiny_mini, "--out", out, "--quiet",
                 *sum((["--set", s] for s in QUICK + ["train.learning_rate=1e-2"]), []))
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(out / "diffusion_pytorch_model.safetensors"), str(out / "genkit_controlnet.json")]
    record = json.loads((out / "genkit_controlnet.json").read_text())
    assert record["steps"] == 4 and record["preprocessor"] == "canny" and record["images"] == 6
    assert record["recipe"]["train"]["batch_size"] == 4 and record["family"] == "genkit-mini"
    weights = trained(out)
    zero = [k for k in weights if k.startswith("controlnet_down_blocks") or k.startswith("controlnet_mid_block")]
    assert zero and all(weights[k].abs().sum() > 0 for k in zero)  # from_unet starts them at 0
    assert len((out / "loss.jsonl").read_text().splitlines()) == 4
    assert ControlNetModel.from_pretrained(str(out)).config.conditioning_embedding_out_channels == [16]

    image = scenes / "scene-00000.png"
    made = run("generate", "a red circle", "--model", tiny_mini, "--out", tmp_path / "images", "--steps", 2,
               "--control", f"model={out},image={image},preprocessor=canny", "--seed", 3)
    assert made.exit_code == 0, made.output
    png = next((tmp_path / "images").glob("*.png"))
    unit = read_record(png)["control"][0]
    assert unit["model"] == str(out) and unit["preprocessor"] == "canny"


def test_a_resumed_run_ends_with_the_same_controlnet(tiny_mini, scenes, tmp_path):
    """Interrupted after step 2 and resumed: bitwise the weights of the unbroken run (caption dropout, flips and
    gradient accumulation on: each a seeded choice per sample)."""
    settings = QUICK + ["train.batch_size=3", "train.gradient_accumulation_steps=2", "data.flip=true",
                        "data.caption_dropout=0.5", "train.lr_scheduler=cosine", "train.learning_rate=1e-2"]
    out = tmp_path / "run"
    genkit.train_controlnet(scenes, out, model=str(tiny_mini), overrides=settings, progress=False)
    unbroken = trained(out)
    shutil.rmtree(out / "checkpoint-0000004")
    (out / "diffusion_pytorch_model.safetensors").unlink()
    result = genkit.train_controlnet(scenes, out, model=str(tiny_mini), overrides=settings, resume=True,
                                     progress=False)
    resumed = trained(out)
    assert result.steps == 4 and resumed.keys() == unbroken.keys()
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)
    assert len((out / "loss.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_an_sd_controlnet_trains_on_latents_and_runs_in_diffusers_pipeline(family, tiny_sd, scenes, tmp_path):
    """SD and SDXL: VAE latents, the conditioning embedding with one level per halving (control image 8x larger
    than the latents), SDXL's added conditions read by the ControlNet too, the validation grid through
    generate(control=...), and the family's diffusers ControlNet pipeline running the result."""
    model = tiny_sd if family == "sd" else testing.build_tiny(family, tmp_path / "model")
    out = tmp_path / "sd-cn"
    genkit.train_controlnet(scenes, out, model=str(model), progress=False,
                            overrides=[s for s in QUICK if "validation" not in s] + [
                                "data.resolution=64", "validation.every=4", "validation.num_inference_steps=2",
                                "train.learning_rate=1e-3"])
    assert (out / "samples" / "step-0000004.png").is_file()
    pipe = genkit.load(str(model))
    control = Control(model=str(out), image=str(scenes / "scene-00001.png"), preprocessor="canny")
    with_cn = pipe.generate("a red circle", seed=1, num_inference_steps=2, width=64, height=64, control=[control])
    assert with_cn.metadata[0]["control"][0]["model_sha256"]
    weight0 = pipe.generate("a red circle", seed=1, num_inference_steps=2, width=64, height=64,
                            control=[Control(model=str(out), image=control.image, preprocessor="canny", weight=0)])
    plain = pipe.generate("a red circle", seed=1, num_inference_steps=2, width=64, height=64)
    assert np.array_equal(np.asarray(weight0.images[0]), np.asarray(plain.images[0]))


def test_ready_control_maps_beside_the_images(tiny_mini, scenes, tmp_path):
    """data.preprocessor=none reads photo.control.png beside photo.png (never an image of its own); one missing is
    one line naming it, exit 2, before anything is written."""
    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    names = sorted(p.name for p in data.glob("scene-*.png"))
    for name in names[1:]:
        shutil.copy(data / name, data / name.replace(".png", ".control.png"))
    out = tmp_path / "out"
    result = run("train", "controlnet", data, "--model", tiny_mini, "--out", out, "--set", "data.preprocessor=none")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "scene-00000.control.png" in result.output, result.output
    assert not out.exists()
    shutil.copy(data / names[0], data / names[0].replace(".png", ".control.png"))
    genkit.train_controlnet(data, out, model=str(tiny_mini), overrides=QUICK + ["data.preprocessor=none"],
                            progress=False)
    record = json.loads((out / "genkit_controlnet.json").read_text())
    assert record["images"] == 6 and record["preprocessor"] == "none"  # the maps were not taken as images


@pytest.mark.parametrize("case", ["preprocessor", "missing data", "transformer family"])
def test_bad_values_are_one_line_and_exit_2(case, tiny_mini, scenes, tmp_path):
    out = tmp_path / "out"
    if case == "preprocessor":
        args = [scenes, "--model", tiny_mini, "--set", "data.preprocessor=hed"]
        expected = "data.preprocessor"
    elif case == "missing data":
        args = [tmp_path / "nowhere", "--model", tiny_mini]
        expected = "does not exist"
    else:
        args = [scenes, "--model", testing.build_tiny("flux", tmp_path / "flux")]
        expected = "trains ControlNets for UNet models"
    result = run("train", "controlnet", *args, "--out", out)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and expected in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_the_placement_scenes_and_their_judge():
    """100 scenes: 20 at each position, prompts without a position (the contradicting ones name another); the
    judge reads a scene drawn where its control map says as at the control map, and a scene drawn where the prompt
    says as at the prompt."""
    placed = placement.placement_scenes(100)
    assert {p: sum(s.control_position == p for s in placed) for p in shapes.POSITIONS} == dict.fromkeys(
        shapes.POSITIONS, 20)
    vocabulary = {w for phrases in shapes.POSITION_PHRASES.values() for phrase in phrases for w in phrase.split()}
    assert all(not set(s.prompt.split()) & (vocabulary - {"the", "a"}) for s in placed)
    contra = placement.contradicting_scenes(100)
    assert all(s.prompt_position != s.control_position and s.prompt_position for s in contra)
    rng = np.random.default_rng(0)
    for scene in [placed[i] for i in rng.choice(100, 10, replace=False)] + list(contra[:10]):
        for where in {scene.control_position, scene.prompt_position} - {None}:
            obj = shapes.ShapeObject(scene.shape, scene.color, *shapes.POSITIONS[where], radius=0.18,
                                     position=where, size="large")
            drawn = shapes.render(shapes.Scene((obj,), scene.prompt), 64)
            judged = placement.judge_placement(drawn, scene)
            assert judged.found and judged.position == where
            assert judged.at_control == (where == scene.control_position)
            assert judged.at_prompt == (where == scene.prompt_position)
    assert placement.summary([placement.Placement(True, "left", True, False),
                              placement.Placement(False, None, False, False)]) == {
        "scenes": 2, "at_control": 50.0, "at_prompt": 0.0, "found": 50.0, "nothing": 50.0}


def test_a_half_precision_base_trains_an_fp32_controlnet(tiny_mini, scenes, tmp_path):
    """train.mixed_precision=bf16 (a GPU's default; bf16 runs on a CPU too): the base is loaded in bf16, the
    ControlNet's weights train and save in fp32, and the validation grid runs it beside the bf16 base."""
    out = tmp_path / "bf16"
    genkit.train_controlnet(scenes, out, model=str(tiny_mini), progress=False, overrides=[
        s for s in QUICK if "validation" not in s] + ["train.mixed_precision=bf16", "validation.every=4",
                                                      "validation.num_inference_steps=2"])
    assert (out / "samples" / "step-0000004.png").is_file()
    assert {t.dtype for t in trained(out).values()} == {torch.float32}
    assert json.loads((out / "genkit_controlnet.json").read_text())["recipe"]["train"]["mixed_precision"] == "bf16"
