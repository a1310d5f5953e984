"""The hires fix (#28): a first pass, an upscale (latent, lanczos or an upscaling model FILE), an image-to-image second
pass; in the library, the CLI (with replay) and genkit serve's A1111 dialect (enable_hr).

Checked: the output size (the scale, rounded to the model's multiple), the record and A1111's infotext fields, pixels
that depend on nothing but the image's own prompt and seed (a batch equals its images made alone), replay, and
one-line refusals of bad values, of a family without img2img and of an edit.
"""

import base64
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import genkit
from genkit import hires
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.generate import GenerationConfig
from genkit.outputs import parse_infotext, read_record
from genkit.prompts import PromptSpec
from genkit.testing import build_tiny, build_tiny_upscaler

STEPS = 2


def pixels(result) -> list:
    return [np.asarray(image) for image in result.images]


def has_spandrel() -> bool:
    try:
        import spandrel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def mini(tiny_mini):
    return genkit.load(str(tiny_mini), device="cpu")


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return genkit.load(str(tiny_sd), device="cpu")


@pytest.fixture(params=["mini", "sd"])
def pipeline(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_output_size_record_and_infotext(pipeline, upscaler):
    config = GenerationConfig(seed=1, num_inference_steps=STEPS, hires_scale=1.5, hires_upscaler=upscaler)
    result = pipeline.generate(["a red circle"], config)
    width, height = (pipeline.defaults[k] for k in ("width", "height"))
    multiple = pipeline.size_factor
    assert result.images[0].size == (round(width * 1.5 / multiple) * multiple, round(height * 1.5 / multiple) * multiple)
    record = result.metadata[0]
    assert {k: record[k] for k in record if k.startswith("hires_")} == {
        "hires_scale": 1.5, "hires_strength": hires.STRENGTH, "hires_steps": 0, "hires_upscaler": upscaler}
    assert (record["width"], record["height"]) == (width, height)  # the first pass's size, as A1111's Size says
    fields = parse_infotext(genkit.outputs.infotext(record))
    assert fields["Hires upscale"] == "1.5" and fields["Denoising strength"] == str(hires.STRENGTH)
    assert fields["Hires upscaler"] == upscaler.capitalize() and "Hires steps" not in fields
    assert fields["Size"] == f"{width}x{height}"
    plain = pipeline.generate(["a red circle"], GenerationConfig(seed=1, num_inference_steps=STEPS))
    assert not any(k.startswith("hires_") for k in plain.metadata[0])
    assert "Hires upscale" not in parse_infotext(genkit.outputs.infotext(plain.metadata[0]))


def test_sizes_round_to_the_models_multiple():
    assert hires.size(64, 64, 2, 8) == (128, 128)
    assert hires.size(64, 40, 1.3, 8) == (80, 56)  # 83.2 -> 80, 52 -> 56 (halves up)
    assert hires.size(16, 16, 1, 16) == (16, 16)


def test_a_batch_equals_its_images_made_alone(pipeline):
    specs = [PromptSpec("a red circle", seed=5), PromptSpec("a blue square", seed=6),
             PromptSpec("a green triangle at the top", seed=7)]
    config = GenerationConfig(num_inference_steps=STEPS, hires_scale=2, batch_size=3, hires_steps=3)
    together = pixels(pipeline.generate(specs, config))
    alone = [pixels(pipeline.generate([spec], config))[0] for spec in specs]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))


def test_the_second_pass_redraws(sd):
    """The hires image is the upscaled first pass redrawn: not its plain resize, and redrawn more or less by strength."""
    base = dict(seed=2, num_inference_steps=4, hires_scale=2, hires_upscaler="lanczos")
    low = pixels(sd.generate(["a red circle"], GenerationConfig(**base, hires_strength=0.3)))[0]
    high = pixels(sd.generate(["a red circle"], GenerationConfig(**base, hires_strength=0.9)))[0]
    first = sd.generate(["a red circle"], GenerationConfig(seed=2, num_inference_steps=4)).images[0]
    resized = np.asarray(first.resize((first.width * 2, first.height * 2), Image.LANCZOS))
    assert not np.array_equal(low, high)
    assert not np.array_equal(low, resized) and not np.array_equal(high, resized)


def test_hires_and_plain_jobs_never_share_a_batch(sd):
    plain = sd.plan(["a red circle"], GenerationConfig(seed=1))[0]
    fixed = sd.plan(["a red circle"], GenerationConfig(seed=1, hires_scale=2))[0]
    lanczos = sd.plan(["a red circle"], GenerationConfig(seed=1, hires_scale=2, hires_upscaler="Lanczos"))[0]
    assert len({sd.batch_key(plain), sd.batch_key(fixed), sd.batch_key(lanczos)}) == 3  # the serve queue's key too
    assert lanczos.hires_upscaler == "lanczos"


def test_an_upscaling_model_file(sd, tmp_path):
    if not has_spandrel():
        pytest.skip("spandrel is not installed (pip install 'genkit[upscale]')")
    model = build_tiny_upscaler(tmp_path / "2x-tiny.safetensors", scale=2)
    config = GenerationConfig(seed=1, num_inference_steps=STEPS, hires_scale=2, hires_upscaler=str(model))
    result = sd.generate(["a red circle"], config)
    assert result.images[0].size == (128, 128) and result.metadata[0]["hires_upscaler"] == str(model)
    assert parse_infotext(genkit.outputs.infotext(result.metadata[0]))["Hires upscaler"] == "2x-tiny"
    lanczos = sd.generate(["a red circle"], GenerationConfig(seed=1, num_inference_steps=STEPS, hires_scale=2,
                                                            hires_upscaler="lanczos"))
    assert not np.array_equal(pixels(result)[0], pixels(lanczos)[0])


def test_an_upscaling_model_without_spandrel_is_one_line(sd, tmp_path):
    if has_spandrel():
        pytest.skip("spandrel is installed")
    model = build_tiny_upscaler(tmp_path / "2x-tiny.safetensors")
    with pytest.raises(GenkitError) as info:
        sd.plan(["a red circle"], GenerationConfig(hires_scale=2, hires_upscaler=str(model)))
    assert "pip install 'genkit[upscale]'" in str(info.value) and info.value.param == "hires_upscaler"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("settings, param, words", [
    (dict(hires_scale=0.5), "hires_scale", "must be a factor from 1 to 8, got 0.5"),
    (dict(hires_scale="2"), "hires_scale", "must be a factor from 1 to 8, got '2'"),
    (dict(hires_scale=2, hires_strength=0), "hires_strength", "must be a number in (0, 1], got 0"),
    (dict(hires_scale=2, hires_strength=1.5), "hires_strength", "must be a number in (0, 1], got 1.5"),
    (dict(hires_scale=2, hires_steps=-1), "hires_steps", "must be a whole number >= 0, got -1"),
    (dict(hires_scale=2, hires_steps=1, hires_strength=0.5), "hires_strength", "leaves the second pass no step"),
    (dict(hires_scale=2, hires_upscaler="R-ESRGAN 4x+"), "hires_upscaler", "R-ESRGAN 4x+: no such upscaler"),
    (dict(hires_strength=0.5), "hires_strength", "applies only to the hires fix"),
    (dict(hires_upscaler="lanczos"), "hires_upscaler", "applies only to the hires fix"),
    (dict(hires_scale=8, width=4096), "hires_scale", None),
], ids=["small-scale", "text-scale", "no-strength", "big-strength", "negative-steps", "no-step", "unknown-upscaler",
        "strength-alone", "upscaler-alone", "too-large"])
def test_bad_values_are_one_line(sd, settings, param, words):
    with pytest.raises(GenkitError) as info:
        sd.plan(["a red circle"], GenerationConfig(seed=1, **settings))
    message = str(info.value)
    assert "\n" not in message
    if words is None:
        assert "hires_scale 8 makes a width of 32768" in message
    else:
        assert words in message and info.value.param == param


def test_an_edit_or_a_family_without_img2img_refuses_the_hires_fix(sd, tmp_path):
    source = Image.new("RGB", (64, 64), "red")
    with pytest.raises(GenkitError, match="it does not edit an input image") as info:
        sd.plan(["a red circle"], GenerationConfig(hires_scale=2, image=source))
    assert info.value.param == "hires_scale"
    sana = genkit.load(str(build_tiny("sana", tmp_path / "sana")), device="cpu")
    with pytest.raises(GenkitError, match="models have no img2img pipeline in diffusers") as info:
        sana.plan(["a red circle"], GenerationConfig(hires_scale=2))
    assert info.value.param == "hires_scale"


def test_the_command_line_and_replay(tiny_mini, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["generate", "a red circle", "a blue square", "--model", str(tiny_mini), "--steps",
                                  "2", "--seed", "3", "--hires", "2", "--hires-strength", "0.6", "--hires-steps", "3",
                                  "--hires-upscaler", "lanczos", "--out", str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.strip().splitlines()]
    image = out / records[1]["file"]
    with Image.open(image) as made:
        assert made.size == (32, 32)
        fields = parse_infotext(made.text["parameters"])
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"], fields["Denoising strength"]) == \
        ("2", "3", "Lanczos", "0.6")
    assert read_record(image)["hires_strength"] == 0.6
    replayed = runner.invoke(main, ["replay", str(image)])
    assert replayed.exit_code == 0 and "identical to the original" in replayed.stderr, replayed.output


@pytest.mark.parametrize("flags, words", [
    (["--hires", "0"], "Error: --hires must be a factor from 1 to 8, got 0.0"),
    (["--hires-strength", "0.5"], "Error: --hires-strength 0.5 applies only to the hires fix (pass --hires SCALE"),
    (["--hires", "2", "--hires-upscaler", "nope.pth"], "Error: --hires-upscaler nope.pth: no such upscaler"),
])
def test_the_command_lines_mistakes_are_one_line_and_write_nothing(tiny_mini, tmp_path, flags, words):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(tiny_mini), "--out", str(out),
                                       *flags])
    assert result.exit_code == 2 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


# --- genkit serve's A1111 dialect ----------------------------------------------------------------------------------
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server(sd, tmp_path_factory):
    from genkit.serve import Limits, create_app
    from genkit.serve.runner import Background

    app = create_app([sd], out=tmp_path_factory.mktemp("served"), limits=Limits(max_side=256, max_images=4),
                     gather=0.02)
    background = Background(app)
    url = background.start()
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    background.stop()


def test_a1111_enable_hr(server, sd):
    body = {"prompt": "a red circle", "seed": 4, "steps": 2, "width": 64, "height": 64, "enable_hr": True,
            "hr_scale": 2, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 3, "denoising_strength": 0.5}
    answer = server.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    made = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert made.size == (128, 128)
    info = json.loads(answer.json()["info"])
    fields = parse_infotext(info["infotexts"][0])
    assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Denoising strength"]) == ("2", "Lanczos", "0.5")
    assert info["denoising_strength"] == 0.5
    library = sd.generate(["a red circle"], GenerationConfig(seed=4, num_inference_steps=2, width=64, height=64,
                                                             hires_scale=2, hires_upscaler="lanczos", hires_steps=3,
                                                             hires_strength=0.5))
    assert np.array_equal(np.asarray(made.convert("RGB")), pixels(library)[0])
    resized = server.post("/sdapi/v1/txt2img", json={**body, "hr_scale": 4, "hr_resize_x": 96, "hr_resize_y": 96,
                                                     "denoising_strength": None, "hr_upscaler": None})
    assert resized.status_code == 200, resized.text
    fields = parse_infotext(json.loads(resized.json()["info"])["infotexts"][0])
    assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Denoising strength"]) == ("1.5", "Latent", "0.75")


@pytest.mark.parametrize("body, field, words", [
    ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "'R-ESRGAN 4x+' is not offered (valid: Latent, Lanczos"),
    ({"hr_scale": 0.5}, "hr_scale", "hr_scale must be a factor from 1 to 8"),
    ({"hr_resize_x": 128, "hr_resize_y": 96}, "hr_resize_x", "genkit scales both by one factor"),
    ({"denoising_strength": 2}, "denoising_strength", "denoising_strength must be a number in (0, 1]"),
    ({"hr_scale": 8}, "hr_scale", "at most 256 pixels wide and high (--max-size)"),
])
def test_a1111_hires_mistakes_name_the_field(server, body, field, words):
    answer = server.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 64, "height": 64,
                                                    "enable_hr": True, **body})
    assert answer.status_code == 422 and words in answer.text, answer.text
    assert answer.json()["field"] == field


def test_a1111_img2img_refuses_enable_hr(server):
    image = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(image, format="PNG")
    answer = server.post("/sdapi/v1/img2img", json={"prompt": "a red circle", "steps": 2, "enable_hr": True,
                                                    "init_images": [base64.b64encode(image.getvalue()).decode()]})
    assert answer.status_code == 422 and "enable_hr" in answer.text
