"""ControlNet (#28, genkit.controlnet): every family with a ControlNet in diffusers, with tiny random ControlNets built
in genkit.testing (ControlNetModel.from_unet for the UNet families, the transformer families' control models from their
transformer's config) and saved and loaded as a user's folder.

Checked per family: a ControlNet changes the image and weight 0 is the image without one (pixel-equal); a batch equals
its images made alone, each with its own control image; start/end act in the steps they name; two at once; refusals
where the family's pipeline takes one ControlNet or no bounds. Then: the canny preprocessor and A1111's "Crop and
Resize"; a ControlNet from one .safetensors file; bad `--control` values as one line and exit 2 with nothing written;
a ControlNet of another family; the record and `genkit replay`; genkit serve's A1111 request
(alwayson_scripts.controlnet) and sd-webui-controlnet's list routes. Tiny models, 2 steps.
"""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import genkit
from genkit import controlnet, families, testing
from genkit.cli import main
from genkit.controlnet import Control
from genkit.errors import GenkitError
from genkit.generate import GenerationConfig
from genkit.images import sha256_of
from genkit.outputs import read_record
from genkit.prompts import PromptSpec
from genkit.run import replay_image
from tests.tiny_models import per_name

STEPS = 2
# the families whose tiny model genkit.testing builds and that have a ControlNet in diffusers
FAMILIES = [name for name in testing.FAMILIES if families.get(name).controlnet_classes]
# their ControlNet pipelines draw each unit's control latents from the VAE's distribution with the image's generator,
# so two units on one image read two draws: the exact sums below hold for the others
SAMPLED = ("flux", "qwen-image")


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB")) for image in result.images]).astype(int)


def noise_image(path: Path, seed: int, size=(40, 48)) -> Path:
    """A random RGB control image of another size than the output (so it is fitted)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control-images")
    return [noise_image(folder / f"control-{k}.png", k) for k in range(2)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_mini, tiny_sd):
    """family -> (model folder, ControlNet folder), built once per module."""

    def make(name):
        folder = tmp_path_factory.mktemp(name)
        own = {"genkit-mini": tiny_mini, "sd": tiny_sd}
        model = own[name] if name in own else testing.build_tiny(name, folder / "model")
        return model, testing.build_tiny_controlnet(model, folder / "controlnet")

    return per_name(make)


@pytest.fixture(scope="module")
def loaded(built):
    cache = {}

    def get(name):
        if name not in cache:
            model, folder = built(name)
            cache[name] = (genkit.load(str(model), device="cpu", controlnet=[folder]), folder)
        return cache[name]

    return get


def config(name, **settings) -> GenerationConfig:
    height, width = testing.TINY_SIZE[name]
    return GenerationConfig(seed=5, num_inference_steps=STEPS, width=width, height=height, **settings)


# --- per family -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_a_controlnet_changes_the_image_and_weight_0_is_none(name, loaded, images):
    pipeline, folder = loaded(name)
    prompts = ["a red circle", "a blue square"]
    plain = pixels(pipeline.generate(prompts, config(name)))
    steered = pipeline.generate(prompts, config(name, control=[Control(folder, images[0])]))
    off = pipeline.generate(prompts, config(name, control=[Control(folder, images[0], weight=0)]))
    assert np.abs(pixels(steered) - plain).max() > 0
    assert np.array_equal(pixels(off), plain)
    unit = steered.metadata[0]["control"][0]
    assert unit == {"model": str(folder), "name": folder.name, "model_sha256": controlnet.digest(folder),
                    "image": str(images[0]), "image_sha256": sha256_of(images[0]),
                    "preprocessor": "none", "weight": 1.0, "start": 0.0, "end": 1.0}
    assert "control" not in pipeline.generate(["a"], config(name)).metadata[0]  # said only where given


@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_equals_its_images_alone_each_with_its_own_control_image(name, loaded, images):
    pipeline, folder = loaded(name)
    specs = [PromptSpec("a red circle", seed=11, control=[Control(folder, images[0])]),
             PromptSpec("a blue square", seed=12, control=[Control(folder, images[1])])]
    batch = pipeline.generate(specs, config(name, batch_size=2))
    jobs = pipeline.plan(specs, config(name))
    assert pipeline.batch_key(jobs[0]) == pipeline.batch_key(jobs[1])  # one batch: only the images differ
    alone = [pixels(pipeline.generate([spec], config(name, batch_size=1)))[0] for spec in specs]
    assert np.array_equal(pixels(batch), np.stack(alone))
    assert not np.array_equal(*alone) and batch.metadata[1]["control"][0]["image"] == str(images[1])


@pytest.mark.parametrize("name", [n for n in FAMILIES if families.get(n).controlnet_bounds])
def test_start_and_end_act_in_the_steps_they_name(name, loaded, images):
    """Each half of the steps changes the image on its own; where the control image's latents are not sampled, the
    two halves as two units are exactly the whole (in each step one of them acts at weight 1, the other at 0)."""
    pipeline, folder = loaded(name)
    made = {bounds: pixels(pipeline.generate(["a red circle"], config(name, control=[
        Control(folder, images[0], start=bounds[0], end=bounds[1])]))) for bounds in ((0, 0.5), (0.5, 1), (0, 1))}
    plain = pixels(pipeline.generate(["a red circle"], config(name)))
    for a in list(made.values()) + [plain]:
        assert sum(np.array_equal(a, b) for b in list(made.values()) + [plain]) == 1  # all four differ
    if pipeline.family.controlnet_several and name not in SAMPLED:
        halves = pixels(pipeline.generate(["a red circle"], config(name, control=[
            Control(folder, images[0], start=0, end=0.5), Control(folder, images[0], start=0.5, end=1)])))
        assert np.array_equal(halves, made[(0, 1)])


@pytest.mark.parametrize("name", [n for n in FAMILIES if families.get(n).controlnet_several])
def test_two_controlnets_at_once(name, loaded, built, images, tmp_path):
    pipeline, folder = loaded(name)
    other = testing.build_tiny_controlnet(built(name)[0], tmp_path / "second", seed=1)
    one, two = (Control(folder, images[0]), Control(other, images[1]))
    alone = [pixels(pipeline.generate(["a red circle"], config(name, control=[unit]))) for unit in (one, two)]
    both = pipeline.generate(["a red circle"], config(name, control=[one, two]))
    assert all(not np.array_equal(pixels(both), a) for a in alone)
    assert [unit["name"] for unit in both.metadata[0]["control"]] == [folder.name, "second"]
    if name not in SAMPLED:  # the residuals are summed: two halves of one unit are the unit
        halves = [Control(folder, images[0], weight=0.5), Control(folder, images[0], weight=0.5)]
        assert np.array_equal(pixels(pipeline.generate(["a red circle"], config(name, control=halves))), alone[0])


@pytest.mark.parametrize("name", [n for n in FAMILIES if not families.get(n).controlnet_several
                                  or not families.get(n).controlnet_bounds])
def test_what_a_familys_controlnet_pipeline_cannot_take_is_refused(name, loaded, images):
    pipeline, folder = loaded(name)
    family = pipeline.family
    if not family.controlnet_several:
        with pytest.raises(GenkitError, match="takes one ControlNet at a time") as info:
            pipeline.plan(["a"], config(name, control=[Control(folder, images[0]), Control(folder, images[1])]))
        assert info.value.param == "control"
    if not family.controlnet_bounds:
        with pytest.raises(GenkitError, match="acts in every step"):
            pipeline.plan(["a"], config(name, control=[Control(folder, images[0], start=0.5)]))


def test_the_controlnet_pipeline_shares_the_loaded_models_as_they_are(tiny_sd, built, images):
    """Made of the loaded models, with no copy and no cast (diffusers' from_pipe would make every model float32, the
    loaded pipeline's own included); the ControlNet in the model's dtype."""
    import torch

    _, folder = built("sd")
    pipeline = genkit.load(str(tiny_sd), device="cpu", dtype="bf16")
    result = pipeline.generate(["a red circle"], config("sd", control=[Control(folder, images[0])]))
    (pipe,) = [p for key, p in pipeline._edit_pipes.items() if key[0] == "control"]
    assert pipe.unet is pipeline.pipe.unet and pipe.vae is pipeline.pipe.vae
    assert pipeline.pipe.unet.dtype == torch.bfloat16 and pipe.controlnet.dtype == torch.bfloat16
    assert result.metadata[0]["dtype"] == "bfloat16"


# --- preprocessing, files, refusals ----------------------------------------------------------------------------------


def test_canny_is_a1111s_and_crop_and_resize_fits_the_centre():
    cv2 = pytest.importorskip("cv2")
    square = np.zeros((64, 64, 3), dtype=np.uint8)
    square[16:48, 16:48] = 255
    edges = controlnet.canny(Image.fromarray(square))
    array = np.asarray(edges)
    assert edges.mode == "RGB" and set(np.unique(array)) == {0, 255}
    assert np.array_equal(array[..., 0], cv2.Canny(square, 100, 200)) and (array[..., 0] == array[..., 2]).all()
    assert array[32, 32].sum() == 0 and array[0, 0].sum() == 0 and array[16:48, 15:17].any()  # the border only
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # the middle third is white
    fitted = np.asarray(controlnet.fit(Image.fromarray(wide), 16, 16))
    assert fitted.shape == (16, 16, 3) and fitted[:, 4:12].min() > 200  # covered, then its centre cut
    made = controlnet.control_image(Image.fromarray(wide), "canny", 32, 16)
    assert made.size == (32, 16) and np.asarray(made).max() == 255


def test_canny_through_the_engine(loaded, images):
    pytest.importorskip("cv2")
    pipeline, folder = loaded("genkit-mini")
    result = pipeline.generate(["a red circle"], config("genkit-mini", control=[
        Control(folder, images[0], preprocessor="canny")]))
    raw = pipeline.generate(["a red circle"], config("genkit-mini", control=[Control(folder, images[0])]))
    assert result.metadata[0]["control"][0]["preprocessor"] == "canny"
    assert not np.array_equal(pixels(result), pixels(raw))


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_a_controlnet_in_one_safetensors_file(loaded, images, tmp_path, layout):
    """A single file, in diffusers' names (loaded into the config made from the model's UNet) or in the original
    ControlNet's (A1111's files: converted by diffusers' from_single_file with that config, offline): the same pixels
    as its folder."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    pipeline, folder = loaded("sd")
    file = tmp_path / "canny-sd.safetensors"
    model = ControlNetModel.from_pretrained(str(folder))
    state = model.state_dict() if layout == "diffusers" else testing.ldm_controlnet(model.state_dict(), model.config)
    save_file({key: value.contiguous() for key, value in state.items()}, str(file))
    by_file = pipeline.generate(["a red circle"], config("sd", control=[Control(file, images[0])]))
    by_folder = pipeline.generate(["a red circle"], config("sd", control=[Control(folder, images[0])]))
    assert np.array_equal(pixels(by_file), pixels(by_folder))
    assert by_file.metadata[0]["control"][0]["name"] == "canny-sd"


def test_a_controlnet_of_another_model_is_one_line(loaded, built, images):
    pipeline, _ = loaded("sd")
    _, mini_controlnet = built("genkit-mini")  # a ControlNetModel too, for another UNet
    with pytest.raises(GenkitError, match="does not fit") as info:
        pipeline.plan(["a"], config("sd", control=[Control(mini_controlnet, images[0])]))
    assert info.value.param == "control" and "\n" not in str(info.value)


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def invoke(*args):
        return CliRunner().invoke(main, ["generate", *args])

    return invoke


@pytest.mark.parametrize("spec, message", [
    ("image=a.png", "--control image=a.png: needs model=PATH"),
    ("model={cn}", "needs image=PATH"),
    ("model={cn},image=a.png,strength=1", "--control strength: not a ControlNet unit key"),
    ("model={cn},image=a.png,weight=3", "--control weight=3: must be from 0 to 2"),
    ("model={cn},image=a.png,weight=high", "--control weight=high: not a number"),
    ("model={cn},image=a.png,start=0.6,end=0.4", "start must be below end"),
    ("model={cn},image=a.png,end=1.5", "--control end=1.5: must be from 0 to 1"),
    ("model={cn},image=a.png,preprocessor=depth", "--control preprocessor=depth: not built in"),
    ("model=nowhere,image=a.png", "--control model=nowhere: no such ControlNet"),
    ("model={cn},image=missing.png", "--control image=missing.png: no such image file"),
    ("model={flux},image=a.png", "is a FluxControlNetModel, a ControlNet for Flux.1"),
], ids=["no-model", "no-image", "unknown-key", "weight", "weight-text", "bounds", "end", "preprocessor", "model-path",
        "image-path", "other-family"])
def test_bad_control_values_are_one_line_and_exit_2(run, built, tiny_mini, tmp_path, spec, message):
    noise_image(tmp_path / "a.png", 0)
    text = spec.format(cn=built("genkit-mini")[1], flux=built("flux")[1] if "{flux}" in spec else "")
    result = run("a red circle", "--model", str(tiny_mini), "--steps", "2", "--control", text, "--out", "out")
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))


def test_a_family_without_controlnet_refuses_it_in_one_line(tmp_path, images, built):
    name = next(n for n in testing.FAMILIES if not families.get(n).controlnet_classes)
    model = testing.build_tiny(name, tmp_path / "model")
    pipeline = genkit.load(str(model), device="cpu")
    with pytest.raises(GenkitError, match="have no ControlNet in diffusers") as info:
        pipeline.plan(["a"], config(name, control=[Control(built("genkit-mini")[1], images[0])]))
    assert info.value.param == "control"


def test_the_cli_records_each_control_and_replay_remakes_the_image(run, built, tiny_mini, images, tmp_path):
    _, folder = built("genkit-mini")
    result = run("a red circle", "a blue square", "--model", str(tiny_mini), "--steps", "2", "--seed", "3", "-W", "32",
                 "-H", "32", "--control", f"model={folder},image={images[0]},weight=0.8,end=0.5", "--control",
                 f"model={folder},image={images[1]},start=0.5", "--out", "out")
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "out").glob("0*.png"))
    record = read_record(files[1])
    assert [(u["weight"], u["start"], u["end"], u["image"]) for u in record["control"]] == [
        (0.8, 0.0, 0.5, str(images[0])), (1.0, 0.5, 1.0, str(images[1]))]
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["control"] == read_record(files[0])["control"]
    replayed = CliRunner().invoke(main, ["replay", str(files[1]), "--out", "again"])
    assert replayed.exit_code == 0 and "identical to the original" in replayed.output, replayed.output
    original = images[1].read_bytes()
    try:
        noise_image(images[1], 7)
        again = CliRunner().invoke(main, ["replay", str(files[1]), "--out", "again"])
    finally:
        images[1].write_bytes(original)
    assert again.exit_code == 2 and "control image" in again.output and again.output.count("\n") == 1


def test_a_manifest_line_with_control_makes_the_run_again(run, built, tiny_mini, images, tmp_path):
    _, folder = built("genkit-mini")
    first = run("a red circle", "--model", str(tiny_mini), "--steps", "2", "--seed", "3", "--control",
                f"model={folder},image={images[0]}", "--out", "one")
    assert first.exit_code == 0, first.output
    second = run("--prompts-file", "one/manifest.jsonl", "--model", str(tiny_mini), "--out", "two")
    assert second.exit_code == 0, second.output
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("0*.png")))) for d in ("one", "two"))
    assert np.array_equal(a, b)


def test_genkit_load_preloads_and_checks_its_controlnets(tiny_sd, built):
    with pytest.raises(GenkitError, match="does not fit"):
        genkit.load(str(tiny_sd), device="cpu", controlnet=[built("genkit-mini")[1]])
    with pytest.raises(GenkitError, match="no such ControlNet"):
        genkit.load(str(tiny_sd), device="cpu", controlnet="nowhere")


# --- genkit serve: sd-webui-controlnet's request and routes ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from genkit.serve import Limits, controlnet as routes, create_app
    from genkit.serve.runner import Background

    pipeline, folder = loaded("genkit-mini")
    library = tmp_path_factory.mktemp("controlnets")
    (library / "canny-mini").symlink_to(folder, target_is_directory=True)
    out = tmp_path_factory.mktemp("served")
    app = create_app([pipeline], out=out, limits=Limits(max_side=256, max_images=4, max_steps=20))
    routes.install(app, [library])
    running = Background(app)
    try:
        with httpx.Client(base_url=running.start(), timeout=120) as client:
            yield client, app, pipeline, folder, out
    finally:
        running.stop()


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def unit(image, **fields) -> dict:
    return {"enabled": True, "module": "none", "model": "canny-mini", "weight": 1.0, "image": b64(image),
            "guidance_start": 0.0, "guidance_end": 1.0, **fields}


def test_the_list_routes_answer_in_the_extensions_shapes(server):
    client = server[0]
    models = client.get("/controlnet/model_list").json()
    assert list(models) == ["model_list"] and len(models["model_list"]) == 1
    assert models["model_list"][0].startswith("canny-mini [") and models["model_list"][0].endswith("]")
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"] == ["none", "canny"]
    assert modules["module_detail"]["canny"]["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1,
                                                               "max": 255}
    assert client.get("/controlnet/version").json() == {"version": 2}


def test_an_a1111_request_with_controlnet_is_the_librarys_image(server, images):
    client, app, pipeline, folder, out = server
    listed = client.get("/controlnet/model_list").json()["model_list"][0]
    body = {"prompt": "a red circle", "seed": 21, "steps": 2, "width": 32, "height": 32,
            "alwayson_scripts": {"controlnet": {"args": [unit(images[0], model=listed, weight=0.7),
                                                         {"enabled": False}]}}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
    image = Image.open(images[0]).convert("RGB")
    made = pipeline.generate(["a red circle"], GenerationConfig(seed=21, num_inference_steps=2, width=32, height=32,
                                                                control=[Control(folder.resolve(), image, weight=0.7)]))
    assert np.array_equal(served, np.asarray(made.images[0]))
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"]["ControlNet 0"].startswith('"Module: none, Model: canny-mini, Weight: 0.7')
    record = read_record(out / info["files"][0])
    kept = out / record["control"][0]["image"]  # the control image is kept beside the image, named by its content
    assert kept.is_file() and record["control"][0]["image_sha256"] == sha256_of(kept)
    replayed = replay_image(out / info["files"][0], out=out / "replayed")
    assert replayed.identical, replayed.summary()


@pytest.mark.parametrize("fields, field", [
    ({"module": "depth_midas"}, "alwayson_scripts.controlnet.args.0.module"),
    ({"model": "nowhere"}, "alwayson_scripts.controlnet.args.0.model"),
    ({"model": "../../etc"}, "alwayson_scripts.controlnet.args.0.model"),
    ({"weight": 5}, "alwayson_scripts.controlnet.args.0.weight"),
    ({"resize_mode": "Just Resize"}, "alwayson_scripts.controlnet.args.0.resize_mode"),
    ({"control_mode": 2}, "alwayson_scripts.controlnet.args.0.control_mode"),
    ({"module": "canny", "threshold_a": 64}, "alwayson_scripts.controlnet.args.0.threshold_a"),
    ({"image": None}, "alwayson_scripts.controlnet.args.0.image"),
    ({"weight": "high"}, "alwayson_scripts.controlnet.args.0.weight"),
], ids=["module", "model", "path", "weight", "resize", "control-mode", "threshold", "no-image", "weight-type"])
def test_what_the_server_cannot_do_is_422_naming_the_field(server, images, fields, field):
    client = server[0]
    body = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32,
            "alwayson_scripts": {"controlnet": {"args": [{**unit(images[0]), **fields}]}}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field, response.json()


def test_another_script_is_refused_and_a1111_img2img_with_controlnet_is_named(server, images):
    client = server[0]
    body = {"prompt": "a", "steps": 2, "width": 32, "height": 32, "alwayson_scripts": {"ADetailer": {"args": []}}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422 and response.json()["field"] == "alwayson_scripts.ADetailer"
    body = {"prompt": "a", "steps": 2, "init_images": [b64(images[0])],
            "alwayson_scripts": {"controlnet": {"args": [unit(images[0])]}}}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422 and response.json()["field"] == "alwayson_scripts.controlnet.args"


def test_the_queue_batches_other_images_of_one_control_and_never_other_controls(server, images):
    from genkit.serve.service import Order

    _, app, _, folder, _ = server
    service = app.state.genkit.service
    image_a, image_b = (Image.open(path).convert("RGB") for path in images)

    def key(**unit_fields):
        units = (Control(folder.resolve(), unit_fields.pop("image", image_a), **unit_fields),)
        return service.ticket(Order(prompt="a red circle", num_inference_steps=2, width=32, height=32,
                                    control=units)).key

    assert key() == key(image=image_b)  # the same control with another image: one batch
    assert key() != key(weight=0.5) and key() != key(end=0.5)
    plain = service.ticket(Order(prompt="a red circle", num_inference_steps=2, width=32, height=32)).key
    assert plain != key()
