"""Editing by instruction: `genkit generate "make the circle blue" --image in.png` on a model that edits that way.

Tiny random-weight Qwen-Image-Edit, Qwen-Image-Edit-2511 (several input images) and Flux.2 [klein] models from
genkit.testing: an input image with no strength is read beside the prompt and the whole image is drawn anew (the
family's "instruct" task), through the CLI, the library, a .jsonl line and the OpenAI edits route without a mask.
The output is neither the input nor the text-to-image of the same prompt and seed; the record names each input image
and its sha256, and replay makes the same pixels; a batch of edits is pixel-equal to each alone.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import genkit
from genkit.cli import main
from genkit.outputs import read_record
from genkit.testing import build_tiny

STEPS = "2"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    return {name: build_tiny(name, root / name) for name in ("qwen-image-edit", "qwen-image-edit-plus", "flux2-klein")}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Input images: two of noise (64x64, the smallest Flux.2 [klein] reads) and a small one."""
    folder = tmp_path_factory.mktemp("scene")
    for seed, name in enumerate(("a.png", "b.png")):
        noise(seed, (64, 64)).save(folder / name)
    noise(2, (32, 32)).save(folder / "small.png")
    return folder


def noise(seed: int, size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def generate(folder, args, out):
    result = CliRunner().invoke(main, ["generate", "-q", "--json", "--model", str(folder), "--steps", STEPS, "-o",
                                       str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def png(out, record) -> np.ndarray:
    return np.asarray(Image.open(out / record["file"]).convert("RGB")).astype(int)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_edit_by_instruction_records_its_input_and_replays(folders, scene, monkeypatch):
    monkeypatch.chdir(scene)
    model = folders["qwen-image-edit"]
    edited = generate(model, ["make the circle blue", "--image", "a.png", "-s", "3"], scene / "edit")[0]
    plain = generate(model, ["make the circle blue", "-s", "3", "-W", "64", "-H", "64"], scene / "t2i")[0]
    assert edited["image"] == "a.png" and edited["image_sha256"] == sha256(scene / "a.png")
    assert "strength" not in edited and edited["width"] == edited["height"] == 64  # the input's size
    mine = png(scene / "edit", edited)
    assert np.abs(mine - np.asarray(Image.open("a.png")).astype(int)).mean() > 10  # drawn anew, not the input
    assert not np.array_equal(mine, png(scene / "t2i", plain))
    other = generate(model, ["make the circle blue", "--image", "b.png", "-s", "3"], scene / "other")[0]
    assert not np.array_equal(mine, png(scene / "other", other))  # the input image is read (random weights: faintly)
    replayed = CliRunner().invoke(main, ["replay", str(scene / "edit" / edited["file"]), "-o", str(scene / "r")])
    assert replayed.exit_code == 0 and "identical" in replayed.stderr, replayed.output



def test_several_input_images_from_the_cli_and_a_jsonl_line(folders, scene, monkeypatch):
    monkeypatch.chdir(scene)
    model = folders["qwen-image-edit-plus"]
    both = generate(model, ["put picture 1 on picture 2", "--image", "a.png", "--image", "b.png", "-s", "5"],
                    scene / "both")[0]
    assert both["image"] == ["a.png", "b.png"]
    assert both["image_sha256"] == [sha256(scene / "a.png"), sha256(scene / "b.png")]
    one = generate(model, ["put picture 1 on picture 2", "--image", "a.png", "-s", "5"], scene / "one")[0]
    assert not np.array_equal(png(scene / "both", both), png(scene / "one", one))  # the second image is read

    line = {"prompt": "put picture 1 on picture 2", "image": ["a.png", "b.png"], "seed": 5,
            "image_sha256": both["image_sha256"]}
    (scene / "edits.jsonl").write_text(json.dumps(line) + "\n")
    from_file = generate(model, ["-f", "edits.jsonl"], scene / "jsonl")[0]
    assert np.array_equal(png(scene / "jsonl", from_file), png(scene / "both", both))

    made = scene / "both" / both["file"]
    replayed = CliRunner().invoke(main, ["replay", str(made), "-o", str(scene / "r2")])
    assert replayed.exit_code == 0 and "identical" in replayed.stderr, replayed.output
    (scene / "b.png").rename(scene / "moved.png")  # an input moved: replay names the order to pass them in
    try:
        lost = CliRunner().invoke(main, ["replay", str(made), "-o", str(scene / "r3")])
        assert lost.exit_code == 2 and "read from b.png, not found" in lost.stderr
        found = CliRunner().invoke(main, ["replay", str(made), "-o", str(scene / "r3"), "--image", "a.png",
                                          "--image", "moved.png"])
        assert found.exit_code == 0 and "identical" in found.stderr, found.output
    finally:
        (scene / "moved.png").rename(scene / "b.png")


def test_a_batch_of_edits_equals_each_alone(folders, scene):
    """Flux.2 [klein] with two input images and three prompts; Qwen-Image-Edit-2511, whose diffusers pipeline takes
    one prompt a call, with two prompts of two images each (a run of equal prompts is one call)."""
    images = [Image.open(scene / "a.png"), Image.open(scene / "b.png")]
    for name, prompts, n, image in (("flux2-klein", ["make it red", "a cat on the left", "blue"], 1, images),
                                    ("qwen-image-edit-plus", ["make it red", "a cat on the left"], 2, images[0])):
        model = genkit.load(str(folders[name]), device="cpu")
        settings = dict(image=image, seed=7, num_images_per_prompt=n, num_inference_steps=2)
        together = model.generate(prompts, batch_size=len(prompts) * n, **settings)
        alone = model.generate(prompts, batch_size=1, **settings)
        for k, (a, b) in enumerate(zip(together.images, alone.images)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{name} image {k}"
        assert together.seeds == list(range(7, 7 + len(prompts) * n))
        assert together.metadata[0]["image"] == (["<PIL image>"] * 2 if isinstance(image, list) else "<PIL image>")


BAD = [  # (model, arguments after the prompt, what the one line says)
    ("qwen-image-edit", ["--image", "a.png", "--image", "b.png"], "2 input images: Qwen-Image-Edit edits one"),
    ("flux2-klein", ["--image", "small.png"], "small.png is 32x32; Flux.2 klein reads input images at least 64"),
    ("flux2-klein", ["--image", "a.png", "--strength", "0.5"], "Flux.2 klein models have no img2img pipeline"),
    ("qwen-image-edit", ["--image", "a.png", "--strength", "0.5"], "Qwen-Image-Edit models have no img2img pipeline"),
    ("flux2-klein", ["--image", "a.png", "--image", "b.png", "--mask", "a.png"], "2 input images: inpaint edits one"),
    ("genkit-mini", ["--image", "a.png", "--image", "b.png"], "2 input images: img2img edits one"),
]


@pytest.mark.parametrize("model, args, message", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_instruction_edits_are_one_line_and_write_nothing(folders, scene, monkeypatch, model, args, message):
    monkeypatch.chdir(scene)
    where = folders.get(model, model)
    result = CliRunner().invoke(main, ["generate", "x", "-q", "--model", str(where), "--steps", STEPS, "-o", "bad",
                                       *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.stderr
    assert not (scene / "bad").exists()


# --- the OpenAI edits route without a mask -------------------------------------------------------


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from genkit.serve import Limits, create_app
    from tests.test_serve import serving

    out = tmp_path_factory.mktemp("served-instruct")
    models = [genkit.load(str(folders[name]), device="cpu") for name in ("qwen-image-edit", "flux2-klein")]
    limits = Limits(max_side=128, max_input_side=512, max_images=4, max_steps=8, max_body_bytes=512 * 1024,
                    max_queue=8)
    yield from serving(create_app(models, out=out, limits=limits, gather=0.05), out)


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_edits_without_a_mask_edit_by_instruction(server, folders, scene):
    httpx = pytest.importorskip("httpx")
    from tests.test_serve import pixels

    model = str(folders["qwen-image-edit"])
    form = {"prompt": "make the circle blue", "model": model, "seed": "3", "steps": STEPS, "response_format": "url"}
    # a transparent corner: a mask to DALL-E 2's edits, no mask to an instruction edit (as to OpenAI's GPT image models)
    rgba = noise(0, (64, 64)).convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    with httpx.Client(base_url=server.url, timeout=300) as client:
        edit = client.post("/v1/images/edits", files={"image": ("a.png", encode(rgba), "image/png")}, data=form)
        assert edit.status_code == 200, edit.text
        plain = client.post("/v1/images/generations", json={**form, "seed": 3, "steps": 2, "size": "64x64"})
        assert plain.status_code == 200, plain.text
        made = pixels(client.get(edit.json()["data"][0]["url"]).content).astype(int)
        assert not np.array_equal(made, pixels(client.get(plain.json()["data"][0]["url"]).content).astype(int))
        assert np.abs(made - np.asarray(rgba.convert("RGB")).astype(int)).mean() > 10

        record = read_record(server.out / edit.json()["data"][0]["url"].rsplit("/", 1)[1])
        kept = server.out / record["image"]  # the input the server kept beside it, by its sha256
        assert "strength" not in record and "mask" not in record and sha256(kept) == record["image_sha256"]
        engine = genkit.load(model, device="cpu").generate(["make the circle blue"], image=str(kept), seed=3,
                                                           num_inference_steps=2)
        assert np.array_equal(np.asarray(engine.images[0]).astype(int), made)  # the library's instruction edit

        # several input images where the model reads them (Flux.2 [klein]); one where it does not
        both = client.post("/v1/images/edits", data={**form, "model": str(folders["flux2-klein"])},
                           files=[("image[]", ("a.png", encode(noise(0, (64, 64))), "image/png")),
                                  ("image[]", ("b.png", encode(noise(1, (64, 64))), "image/png"))])
        assert both.status_code == 200, both.text
        record = read_record(server.out / both.json()["data"][0]["url"].rsplit("/", 1)[1])
        assert len(record["image"]) == 2 and len(record["image_sha256"]) == 2
        two = client.post("/v1/images/edits", data={**form, "strength": "0.5"},
                          files=[("image[]", ("a.png", encode(noise(0, (64, 64))), "image/png")),
                                 ("image[]", ("b.png", encode(noise(1, (64, 64))), "image/png"))])
        assert two.status_code == 400 and two.json()["error"]["param"] == "image"
