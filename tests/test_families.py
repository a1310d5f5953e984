"""The contracts of the engine, the CLI and LoRA, on a tiny random-weight model of every diffusers family.

Each family's model is built from config classes by genkit.testing, saved with save_pretrained and
loaded by path, like a user's folder. genkit-mini and SD 1.x also run tests/test_contracts.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import genkit
from genkit import families, lora, testing
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.testing import build_tiny

# every family of genkit.testing in diffusers' folder format (genkit-mini's own runs tests/test_contracts.py too)
FAMILIES = [name for name in testing.FAMILIES if families.get(name).file_format == "diffusers"]
TRANSFORMERS = {name for name in FAMILIES if families.get(name).denoiser_name == "transformer"}
PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folder(family, family_dirs):
    return family_dirs[family]


@pytest.fixture(scope="module")
def pipe(folder):
    return genkit.load(str(folder), device="cpu")


def small(pipe) -> dict:
    """The smallest sizes worth testing: two size multiples a side, two steps."""
    side = 2 * pipe.size_factor
    return dict(width=side, height=side, num_inference_steps=2)


def pixels(result):
    return [np.asarray(image).astype(int) for image in result.images]


def test_family_is_detected_and_recorded(pipe, family):
    assert pipe.family.name == family
    record = pipe.generate(PROMPTS[:1], seed=1, **small(pipe)).metadata[0]
    assert record["family"] == family and record["model"] == pipe.name


def test_batch_equals_singles_and_seeds_are_per_image(pipe):
    batched = pipe.generate(PROMPTS, num_images_per_prompt=2, batch_size=4, seed=5, **small(pipe))
    singles = pipe.generate(PROMPTS, num_images_per_prompt=2, batch_size=1, seed=5, **small(pipe))
    assert batched.seeds == [5, 6, 7, 8]
    for a, b in zip(pixels(batched), pixels(singles)):
        assert np.array_equal(a, b)
    alone = pipe.generate(PROMPTS[1:], seed=7, **small(pipe))  # image 2 of the run: second prompt, seed 7
    assert np.array_equal(pixels(alone)[0], pixels(batched)[2])
    assert not np.array_equal(pixels(batched)[0], pixels(batched)[1])


def test_every_sampler_of_the_family_runs(pipe):
    reference = None
    for name in pipe.family.samplers() + ("default",):
        result = pipe.generate(PROMPTS[:1], scheduler=name, seed=0, **small(pipe))
        image = pixels(result)[0]
        assert image.std() > 1, name  # not blank (NaNs decode to a constant image)
        assert result.metadata[0]["scheduler"] == name
        reference = image if reference is None else reference


def test_a_sampler_of_the_other_kind_is_one_line(pipe):
    wrong = "ddim" if pipe.family.flow else "flow-heun"
    with pytest.raises(GenkitError, match="does not fit") as error:
        pipe.plan(PROMPTS, genkit.GenerationConfig(scheduler=wrong))
    assert "\n" not in str(error.value)


def test_a_sampler_the_family_cannot_run_is_one_line(pipe, folder):
    """Samplers of the right kind that the family's pipelines cannot take (Flux passes sigmas, which flow-heun cannot
    take) are refused before any work, naming the ones that fit; on the command line, exit 2 and no traceback."""
    from genkit.families.base import FLOW_SAMPLERS, UNET_SAMPLERS

    unfit = [s for s in (FLOW_SAMPLERS if pipe.family.flow else UNET_SAMPLERS) if s not in pipe.family.samplers()]
    for name in unfit:
        with pytest.raises(GenkitError) as error:
            pipe.plan(PROMPTS, genkit.GenerationConfig(scheduler=name))
        assert error.value.param == "scheduler" and "\n" not in str(error.value)
        assert f"the samplers that fit: {', '.join(pipe.family.samplers())}" in str(error.value)
        result = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(folder), "--scheduler", name,
                                           "--out", str(Path(folder).parent / "unfit"), "--steps", "1"])
        assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
        assert result.output.strip().count("\n") == 0 and "--scheduler" in result.output, result.output
        assert not (Path(folder).parent / "unfit").exists()


def test_attention_backends_agree(folder, family):
    sdpa = genkit.load(str(folder), device="cpu", attention="sdpa")
    reference = pixels(sdpa.generate(PROMPTS, seed=2, batch_size=2, **small(sdpa)))
    sdpa.set_attention("math")
    for a, b in zip(reference, pixels(sdpa.generate(PROMPTS, seed=2, batch_size=2, **small(sdpa)))):
        assert np.abs(a - b).max() <= 2
    assert sdpa.generate(PROMPTS[:1], seed=2, **small(sdpa)).metadata[0]["attention"] == "math"
    if family in TRANSFORMERS:
        with pytest.raises(GenkitError, match="sliced attention is for UNet"):
            sdpa.set_attention("sliced")


def test_size_multiple_is_checked(pipe):
    bad = pipe.size_factor * 2 + (pipe.size_factor // 2 or 1)
    with pytest.raises(GenkitError, match=f"multiple of {pipe.size_factor}"):
        pipe.plan(PROMPTS, genkit.GenerationConfig(width=bad))


def test_cli_generate_resume_and_replay(folder, pipe, tmp_path):
    out = tmp_path / "out"
    side = str(2 * pipe.size_factor)
    args = ["generate", *PROMPTS, "--model", str(folder), "-n", "2", "--seed", "3", "--steps", "2", "-W", side,
            "-H", side, "--out", str(out), "--quiet", "--batch-size", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    before = {f.name: f.read_bytes() for f in files}
    files[1].unlink()  # a run that stopped early: the rerun makes only what is missing, the same pixels
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and {f.name: f.read_bytes() for f in sorted(out.glob("*.png"))} == before
    replay = CliRunner().invoke(main, ["replay", str(files[2]), "--out", str(tmp_path / "replayed")])
    assert replay.exit_code == 0 and "identical" in replay.output and "differs" not in replay.output


# --- LoRA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(folder, pipe, family, tmp_path_factory):
    """A LoRA trained for 3 steps with a high learning rate, on six small coloured images."""
    from tests.test_lora import make_dataset

    root = tmp_path_factory.mktemp(f"lora-{family}")
    data = make_dataset(root / "data")
    side = max(2 * pipe.size_factor, 32)
    result = genkit.train_lora(data, root / "out", model=str(folder), progress=False, overrides=[
        "train.device=cpu", "train.threads=1", "train.steps=3", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", "train.learning_rate=5e-2", "validation.every=0",
        f"data.resolution={side}", "lora.rank=4", "prior.images=2", "prior.batch_size=2"])
    return result


def test_lora_trains_and_plain_diffusers_makes_genkits_image(trained, folder, family):
    record = json.loads(Path(trained.record).read_text())
    assert record["family"] == family and np.isfinite(trained.loss)
    mine = genkit.load(str(folder), device="cpu")
    base = pixels(mine.generate(PROMPTS[:1], seed=3, **small(mine)))[0]
    lora.apply(mine, [lora.parse_spec(str(trained.out))])
    adapted = pixels(mine.generate(PROMPTS[:1], seed=3, **small(mine)))[0]
    assert np.abs(adapted - base).max() > 5  # the adapter changes the image

    plain = testing.plain_pipeline(folder)  # an editing model's text-to-image pipeline on its components
    plain.set_progress_bar_config(disable=True)
    if hasattr(plain, "load_lora_weights"):  # diffusers' own loader for this pipeline class
        plain.load_lora_weights(str(trained.out))
    else:  # PixArt: diffusers has no LoRA loader; peft reads the same file
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        state = {k.removeprefix("transformer."): v for k, v in
                 load_file(str(trained.weights)).items()}
        adapter = record["recipe"]["lora"]  # rank 4 from the fixture, alpha from the family's defaults
        inject_adapter_in_model(LoraConfig(r=adapter["rank"], lora_alpha=adapter["alpha"],
                                           target_modules=adapter["target_modules"]), plain.transformer)
        set_peft_model_state_dict(plain.transformer, state)
    job = mine.plan(PROMPTS[:1], genkit.GenerationConfig(seed=3, **small(mine)))
    args = mine.family.call_args(job, [torch.Generator().manual_seed(3)], None)
    for key in ("callback", "callback_steps", "callback_on_step_end"):
        args.pop(key, None)
    theirs = np.asarray(plain(**args).images[0]).astype(int)
    assert np.abs(theirs - adapted).max() <= 1


def test_several_loras_with_scales_from_the_cli(trained, folder, pipe, tmp_path):
    side = str(2 * pipe.size_factor)
    common = ["generate", PROMPTS[0], "--model", str(folder), "--seed", "3", "--steps", "2", "-W", side, "-H", side,
              "--quiet", "--json"]
    zero = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "a"), "--lora", f"{trained.out}:0"])
    none = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "b")])
    both = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "c"), "--lora", f"{trained.out}:0.5",
                                     "--lora", f"{trained.weights}:0.25"])
    assert zero.exit_code == none.exit_code == both.exit_code == 0, both.output
    record = json.loads(both.stdout.splitlines()[-1])
    assert [lo["scale"] for lo in record["lora"]] == [0.5, 0.25]
    from PIL import Image

    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in "ab")
    assert np.array_equal(a, b)  # scale 0 is the base model


def test_a_lora_of_another_family_is_one_line_with_the_count(trained, family, family_dirs):
    other = family_dirs["sd3" if family != "sd3" else "flux"]
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(other), "--lora", str(trained.out),
                                       "--steps", "1", "--quiet"])
    assert result.exit_code == 2
    assert "does not fit" in result.output and " of its " in result.output
    assert "Traceback" not in result.output


def test_a_folder_of_an_unknown_family_is_one_line(tmp_path, family_dirs):
    import shutil

    folder = tmp_path / "odd"
    shutil.copytree(family_dirs["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(folder), "--quiet"])
    assert result.exit_code == 2 and "KandinskyV22Pipeline" in result.output and "sd3" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("family", list(testing.FAMILIES))
def test_every_multiple_of_the_size_factor_runs(family, tmp_path):
    """A family's size multiple is the one its pipelines enforce (SD's and PixArt's check 8 whatever the VAE): on
    random architectures (VAE factors 1 to 8), the smallest allowed side and an odd multiple of it generate, and a
    side off the multiple is one line naming the two nearest that work."""
    import random

    for seed in range(3):
        arch = testing.random_arch(family, random.Random(seed))
        pipe = genkit.load(str(testing.build_tiny(family, tmp_path / f"{seed}", arch=arch)), device="cpu")
        m = pipe.size_factor
        for side in (m, 3 * m):
            image = pipe.generate(PROMPTS[:1], width=side, height=side, num_inference_steps=1, seed=0).images[0]
            assert image.size == (side, side)
        if m > 1:
            with pytest.raises(GenkitError, match=f"multiple of {m}.*try {m} or {2 * m}") as error:
                pipe.plan(PROMPTS[:1], genkit.GenerationConfig(width=m + 1))
            assert error.value.param == "width"
