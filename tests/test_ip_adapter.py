"""IP-Adapter (#28, genkit.ipadapter): every family whose diffusers pipeline loads one (SD 1.x/2.x, SDXL, Flux.1), with
tiny random IP-Adapters built in genkit.testing in each family's published layout (h94's, XLabs') beside a tiny CLIP
image encoder, and read through the path a user's file takes.

Checked per family: the adapter changes the image, scale 0 is the image without it (pixel-equal), and a job without it
afterwards on the same loaded pipeline is pixel-equal to one before (the adapter's processors are put in place for its
batches only); the record. Then: a batch equals its images alone; a folder holding the file is the file; adapters of
another family, another base model or another image encoder refused in one line; genkit-mini's refusal; bad
`--ip-adapter`/`--ip-image` values as one line and exit 2 with nothing written; the CLI's record and `genkit replay`.
Tiny models, 2 steps.
"""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import genkit
from genkit import families, testing
from genkit.cli import main
from genkit.controlnet import digest
from genkit.errors import GenkitError
from genkit.generate import GenerationConfig
from genkit.images import sha256_of
from genkit.ipadapter import IPAdapter
from genkit.outputs import read_record
from genkit.prompts import PromptSpec
from tests.test_controlnet import config, images, noise_image, pixels, run  # noqa: F401  (images, run: fixtures)
from tests.tiny_models import per_name

# the families whose tiny model genkit.testing builds and whose diffusers pipeline loads an IP-Adapter
FAMILIES = [name for name in testing.FAMILIES if families.get(name).ip_adapter]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sd):
    """family -> (model folder, IP-Adapter weights file), built once per module."""
    def make(name):
        folder = tmp_path_factory.mktemp(name)
        model = tiny_sd if name == "sd" else testing.build_tiny(name, folder / "model")
        return model, testing.build_tiny_ip_adapter(model, folder / "ip-adapter")

    return per_name(make)


@pytest.fixture(scope="module")
def loaded(built):
    cache = {}

    def get(name):
        if name not in cache:
            model, file = built(name)
            cache[name] = (genkit.load(str(model), device="cpu"), file)
        return cache[name]

    return get


# --- per family -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_an_ip_adapter_changes_the_image_scale_0_is_none_and_the_pipeline_is_left_as_it_was(name, loaded, images):
    pipeline, file = loaded(name)
    prompts = ["a red circle", "a blue square"]
    plain = pixels(pipeline.generate(prompts, config(name)))
    steered = pipeline.generate(prompts, config(name, ip_adapter=IPAdapter(file, images[0], 0.8)))
    off = pipeline.generate(prompts, config(name, ip_adapter=IPAdapter(file, images[0], 0)))
    after = pipeline.generate(prompts, config(name))
    assert np.abs(pixels(steered) - plain).max() > 0
    assert np.array_equal(pixels(off), plain) and np.array_equal(pixels(after), plain)
    assert steered.metadata[0]["ip_adapter"] == {
        "model": str(file), "name": file.stem, "model_sha256": digest(file),
        "image_encoder_sha256": digest(file.parent / "image_encoder"), "image": str(images[0]),
        "image_sha256": sha256_of(images[0]), "scale": 0.8}
    assert "ip_adapter" not in after.metadata[0]  # said only where given


def test_a_batch_equals_its_images_alone_and_other_references_never_share_one(loaded, images):
    pipeline, file = loaded("sd")
    unit = IPAdapter(file, images[0])
    specs = [PromptSpec("a red circle", seed=11), PromptSpec("a blue square", seed=12)]
    batch = pixels(pipeline.generate(specs, config("sd", batch_size=2, ip_adapter=unit)))
    alone = np.concatenate([pixels(pipeline.generate([spec], config("sd", batch_size=1, ip_adapter=unit)))
                            for spec in specs])
    assert np.array_equal(batch, alone)
    first, second = (pipeline.plan(["a"], config("sd", ip_adapter=IPAdapter(file, image)))[0] for image in images)
    assert pipeline.batch_key(first) != pipeline.batch_key(second)
    halves = pipeline.plan(["a"], config("sd", ip_adapter=IPAdapter(file, images[0], 0.5)))[0]
    assert pipeline.batch_key(first) != pipeline.batch_key(halves)


def test_a_folder_holding_the_file_is_the_file(loaded, images):
    pipeline, file = loaded("sd")
    by_file = pipeline.generate(["a red circle"], config("sd", ip_adapter=IPAdapter(file, images[1])))
    by_folder = pipeline.generate(["a red circle"], config("sd", ip_adapter={"model": file.parent,
                                                                             "image": images[1]}))
    assert np.array_equal(pixels(by_file), pixels(by_folder))
    assert by_folder.metadata[0]["ip_adapter"]["model"] == str(file)


# --- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other, message", [
    ("flux", "it is an IP-Adapter for Flux.1; Stable Diffusion 1.x/2.x models take one whose keys start with"),
    ("sdxl", "attention layers and the model has"),
], ids=["another-family", "another-base-model"])
def test_an_ip_adapter_made_for_another_model_is_one_line(loaded, built, images, other, message):
    pipeline, _ = loaded("sd")
    _, file = built(other)
    with pytest.raises(GenkitError, match="does not fit") as info:
        pipeline.plan(["a"], config("sd", ip_adapter=IPAdapter(file, images[0])))
    assert message in str(info.value) and info.value.param == "ip_adapter" and "\n" not in str(info.value)


def test_an_image_encoder_of_another_width_is_one_line(built, images, tmp_path):
    model, _ = built("sd")
    file = testing.build_tiny_ip_adapter(model, tmp_path / "wide", image_embed_dim=24)
    shutil.rmtree(file.parent / "image_encoder")
    shutil.copytree(built("sd")[1].parent / "image_encoder", file.parent / "image_encoder")  # 16 wide
    pipeline = genkit.load(str(model), device="cpu")
    with pytest.raises(GenkitError, match="reads 24-wide image features and the image encoder beside it gives 16"):
        pipeline.plan(["a"], config("sd", ip_adapter=IPAdapter(file, images[0])))
    plain = pipeline.generate(["a"], config("sd"))  # the failed load left the UNet as it was
    again = genkit.load(str(model), device="cpu").generate(["a"], config("sd"))
    assert np.array_equal(pixels(plain), pixels(again))


def test_genkit_mini_refuses_it_naming_the_families_that_take_one(tiny_mini, built, images):
    pipeline = genkit.load(str(tiny_mini), device="cpu")
    with pytest.raises(GenkitError, match="take no IP-Adapter in diffusers") as info:
        pipeline.plan(["a"], GenerationConfig(ip_adapter=IPAdapter(built("sd")[1], images[0])))
    assert all(name in str(info.value) for name in FAMILIES) and info.value.param == "ip_adapter"


@pytest.mark.parametrize("flags, message", [
    (["--ip-adapter", "nowhere", "--ip-image", "a.png"], "--ip-adapter nowhere: no such IP-Adapter file or folder"),
    (["--ip-adapter", "{empty}", "--ip-image", "a.png"], "holds no .safetensors file: pass the adapter's weights file"),
    (["--ip-adapter", "{pickle}", "--ip-image", "a.png"], "an IP-Adapter must be a .safetensors file"),
    (["--ip-adapter", "{bare}", "--ip-image", "a.png"], "no image encoder beside it"),
    (["--ip-adapter", "{flux}", "--ip-image", "a.png"], "it is an IP-Adapter for Flux.1"),
    (["--ip-adapter", "{sd}", "--ip-image", "missing.png"], "--ip-image missing.png: no such image file"),
    (["--ip-adapter", "{sd}", "--ip-image", "broken.png"], "--ip-image broken.png: "),
    (["--ip-adapter", "{sd}", "--ip-image", "a.png:3"], "--ip-image scale 3: must be from 0 to 2"),
    (["--ip-adapter", "{sd}", "--ip-image", "a.png:strong"], "the scale after the last ':' is not a number"),
    (["--ip-adapter", "{sd}"], "needs a reference image (pass --ip-image IMAGE[:SCALE])"),
    (["--ip-image", "a.png"], "needs the adapter it steers through (pass --ip-adapter PATH)"),
], ids=["missing", "empty-folder", "pickle", "no-encoder", "other-family", "no-image", "unreadable-image", "scale",
        "scale-text", "no-image-flag", "no-adapter-flag"])
def test_bad_ip_adapter_values_are_one_line_and_exit_2(run, built, tiny_sd, tmp_path, flags, message):
    noise_image(tmp_path / "a.png", 0)
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "adapter.bin").write_bytes(b"pickle")
    (tmp_path / "bare").mkdir()
    shutil.copy(built("sd")[1], tmp_path / "bare" / "ip-adapter_sd15.safetensors")
    paths = {"empty": tmp_path / "empty", "pickle": tmp_path / "adapter.bin", "bare": tmp_path / "bare",
             "sd": built("sd")[1], "flux": built("flux")[1] if "{flux}" in flags else ""}
    result = run("a red circle", "--model", str(tiny_sd), "--steps", "2", *[f.format(**paths) for f in flags],
                 "--out", "out")
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))


# --- records and replay ---------------------------------------------------------------------------------------------


def test_the_cli_records_the_adapter_and_replay_remakes_the_image(run, built, tiny_sd, images, tmp_path):
    _, file = built("sd")
    result = run("a red circle", "a blue square", "--model", str(tiny_sd), "--steps", "2", "--seed", "3", "-W", "32",
                 "-H", "32", "--ip-adapter", str(file.parent), "--ip-image", f"{images[1]}:0.7", "--out", "out")
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "out").glob("0*.png"))
    record = read_record(files[1])["ip_adapter"]
    assert (record["model"], record["image"], record["scale"]) == (str(file), str(images[1]), 0.7)
    assert record["model_sha256"] == digest(file) and record["image_sha256"] == sha256_of(images[1])
    replayed = CliRunner().invoke(main, ["replay", str(files[1]), "--out", "again"])
    assert replayed.exit_code == 0 and "identical to the original" in replayed.output, replayed.output
    original = images[1].read_bytes()
    try:
        noise_image(images[1], 7)
        again = CliRunner().invoke(main, ["replay", str(files[1]), "--out", "again"])
    finally:
        images[1].write_bytes(original)
    assert again.exit_code == 2 and "reference image" in again.output and again.output.count("\n") == 1
