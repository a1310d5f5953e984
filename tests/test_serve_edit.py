"""genkit serve's editing routes over real HTTP: A1111 img2img (with and without a mask), OpenAI edits.

A uvicorn server on a free localhost port holds the tiny genkit-mini and SD models; every served
image is compared pixel for pixel with the engine's own (`Pipeline.generate(image=, mask=,
strength=)` on the same decoded input), alone and coalesced with other requests' images, and its
record is replayed from the input the server kept beside it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from PIL import Image, ImageOps  # noqa: E402

from genkit.serve import Limits, create_app  # noqa: E402
from tests.test_serve import STEPS, client, models, pixels, serving  # noqa: E402,F401  (client, models: fixtures)
from tests.test_serve import alone as library  # noqa: E402  # the engine's images for a request, made alone

SIZE = (32, 32)
LIMITS = Limits(max_side=64, max_input_side=512, max_images=8, max_steps=50, max_body_bytes=256 * 1024,
                max_queue=32)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("served-edits")
    yield from serving(create_app([models.mini, models.sd], out=out, limits=LIMITS, gather=0.05), out)


# -- inputs ---------------------------------------------------------------------------------------

def noise(seed: int, size=SIZE, mode="RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array, mode)


def right_half(size=SIZE, on=255, off=0, mode="L") -> Image.Image:
    mask = Image.new(mode, size, off)
    mask.paste(on, (size[0] // 2, 0, size[0], size[1]))
    return mask


def encode(image: Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(image: Image.Image, fmt="PNG", data_url=False) -> str:
    text = base64.b64encode(encode(image, fmt)).decode()
    return f"data:image/{fmt.lower()};base64,{text}" if data_url else text


def img2img(client, **body):
    body.setdefault("steps", STEPS)
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- A1111 img2img ----------------------------------------------------------------------------------

def test_img2img_is_the_librarys_image_records_its_kept_input_and_replays(server, client, models):
    from genkit.outputs import read_record
    from genkit.run import replay_image

    source = noise(1)
    body = img2img(client, prompt="a red circle", init_images=[b64(source, data_url=True)], denoising_strength=0.5,
                   seed=3, batch_size=2, cfg_scale=3.0, sampler_name="Euler a")
    expected = library(models.mini, "a red circle", 3, n=2, image=source, strength=0.5, guidance_scale=3.0,
                       scheduler="euler-a")
    assert [np.array_equal(pixels(image), e) for image, e in zip(body["images"], expected)] == [True, True]
    assert not np.array_equal(expected[0], np.asarray(source))  # it was edited, not passed through
    info = json.loads(body["info"])
    assert info["denoising_strength"] == 0.5 and info["all_seeds"] == [3, 4]
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    assert body["parameters"]["init_images"] is None and body["parameters"]["denoising_strength"] == 0.5

    # the record names the input kept beside the image, by its sha256; replay finds it there
    made = server.out / info["files"][0]
    record = read_record(made)
    kept = server.out / record["image"]
    assert record["image"].startswith("input-") and kept.is_file() and record["strength"] == 0.5
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == record["image_sha256"]
    assert np.array_equal(np.asarray(Image.open(kept)), np.asarray(source))
    assert read_record(server.out / info["files"][1])["image"] == record["image"]  # one file per input
    path, identical = replay_image(made, out=server.out / "replays")
    assert identical and path.is_file()


def test_inpainting_keeps_the_unmasked_pixels_and_honours_invert(server, client, models):
    from genkit.outputs import read_record

    source, mask = noise(2), right_half()
    body = img2img(client, prompt="a blue square", init_images=[b64(source)], mask=b64(mask), seed=11,
                   denoising_strength=0.75)
    expected = library(models.mini, "a blue square", 11, image=source, mask=mask, strength=0.75)[0]
    got = pixels(body["images"][0])
    assert np.array_equal(got, expected)
    assert np.array_equal(got[:, :16], np.asarray(source)[:, :16]) and not np.array_equal(got[:, 16:],
                                                                                          np.asarray(source)[:, 16:])
    record = read_record(server.out / json.loads(body["info"])["files"][0])
    assert record["mask"].startswith("mask-") and (server.out / record["mask"]).is_file()

    # inpainting_mask_invert 1: the black half repaints; a mask on a transparent layer repaints where painted
    flipped = img2img(client, prompt="a blue square", init_images=[b64(source)], mask=b64(ImageOps.invert(mask)),
                      inpainting_mask_invert=1, seed=11, denoising_strength=0.75)
    assert np.array_equal(pixels(flipped["images"][0]), expected)
    layer = right_half(on=(255, 255, 255, 255), off=(0, 0, 0, 0), mode="RGBA")
    painted = img2img(client, prompt="a blue square", init_images=[b64(source)], mask=b64(layer), seed=11,
                      denoising_strength=0.75)
    assert np.array_equal(pixels(painted["images"][0]), expected)


def test_img2img_on_a_diffusers_model_with_a_jpeg_input(client, models):
    source = noise(3)
    jpeg = encode(source, "JPEG")
    body = img2img(client, prompt="a green triangle", init_images=[base64.b64encode(jpeg).decode()], seed=5,
                   override_settings={"sd_model_checkpoint": "tiny-sd"})
    decoded = Image.open(io.BytesIO(jpeg))
    assert json.loads(body["info"])["sd_model_name"].endswith("tiny-sd")
    assert np.array_equal(pixels(body["images"][0]),
                          library(models.sd, "a green triangle", 5, image=decoded, strength=0.75)[0])


# -- OpenAI edits -----------------------------------------------------------------------------------

def test_openai_client_edits_with_a_mask_or_the_images_transparency(server, models):
    openai = pytest.importorskip("openai")
    from genkit import images

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    source = noise(4)
    hole = right_half(on=(0, 0, 0, 0), off=(0, 0, 0, 255), mode="RGBA")  # transparent = edit (OpenAI's rule)
    result = client.images.edit(image=("in.png", encode(source), "image/png"), mask=("mask.png", encode(hole),
                                "image/png"), prompt="a yellow circle", n=2, response_format="b64_json",
                                extra_body={"seed": 21, "steps": STEPS})
    expected = library(models.mini, "a yellow circle", 21, n=2, image=source, mask=right_half())
    assert [np.array_equal(pixels(d.b64_json), e) for d, e in zip(result.data, expected)] == [True, True]
    assert [d.seed for d in result.data] == [21, 22]

    # no mask: the image's own transparent pixels are the region to edit
    cut = source.convert("RGBA")
    cut.putalpha(ImageOps.invert(right_half()))
    alpha = client.images.edit(image=("cut.png", encode(cut), "image/png"), prompt="a yellow circle",
                               extra_body={"seed": 21, "steps": STEPS})
    assert np.array_equal(pixels(alpha.data[0].b64_json),
                          library(models.mini, "a yellow circle", 21, image=cut,
                                  mask=images.read_mask(cut, from_alpha=True))[0])

    # an opaque image and no mask: img2img, with genkit's strength extension
    whole = client.images.edit(image=("in.png", encode(source), "image/png"), prompt="a yellow circle",
                               response_format="url", extra_body={"seed": 21, "steps": STEPS, "strength": 0.5})
    assert np.array_equal(pixels(httpx.get(whole.data[0].url).content),
                          library(models.mini, "a yellow circle", 21, image=source, strength=0.5)[0])

    with pytest.raises(openai.BadRequestError) as no_alpha:
        client.images.edit(image=("in.png", encode(source), "image/png"), mask=("m.png", encode(right_half()),
                           "image/png"), prompt="x")
    assert no_alpha.value.param == "mask" and "transparen" in no_alpha.value.body["message"]
    with pytest.raises(openai.BadRequestError) as small:
        client.images.edit(image=("in.png", encode(source), "image/png"),
                           mask=("m.png", encode(right_half((16, 16), on=(0, 0, 0, 0), off=(0, 0, 0, 255),
                                                            mode="RGBA")), "image/png"), prompt="x")
    assert small.value.param == "mask" and "16x16" in small.value.body["message"]


# -- coalescing -------------------------------------------------------------------------------------

def test_edits_coalesce_only_with_their_own_kind_and_equal_their_images_made_alone(server, models, monkeypatch):
    """Requests queued together: three img2img at one strength share a batch although their inputs differ;
    another strength, inpainting and text-to-image each run apart; every image equals the library's alone."""
    queue = server.state.queue
    gate, batches, original = threading.Event(), [], queue.run_batch

    def watched(key, jobs, check):
        if not batches:
            gate.wait(60)  # the first batch holds the worker until every request is queued
        batches.append([(job.task, job.strength, job.prompt) for job in jobs])
        return original(key, jobs, check)

    monkeypatch.setattr(queue, "run_batch", watched)
    mask = right_half()
    asks = [  # (name, route, body, the library's settings)
        ("blocker", "txt2img", {"prompt": "a blocker"}, {}),
        *[(f"edit{k}", "img2img", {"prompt": f"edit {k}", "init_images": [b64(noise(10 + k))],
                                   "denoising_strength": 0.5}, {"image": noise(10 + k), "strength": 0.5})
          for k in range(3)],
        ("txt", "txt2img", {"prompt": "edit 0"}, {}),
        ("stronger", "img2img", {"prompt": "edit 0", "init_images": [b64(noise(10))], "denoising_strength": 0.75},
         {"image": noise(10), "strength": 0.75}),
        ("inpaint", "img2img", {"prompt": "edit 0", "init_images": [b64(noise(10))], "mask": b64(mask),
                                "denoising_strength": 0.5}, {"image": noise(10), "mask": mask, "strength": 0.5}),
    ]

    def ask(item):
        name, route, body, _ = item
        with httpx.Client(base_url=server.url, timeout=120) as client:
            response = client.post(f"/sdapi/v1/{route}", json={**body, "seed": 40, "steps": STEPS, "width": 32,
                                                               "height": 32})
            assert response.status_code == 200, response.text
            return response.json()

    with ThreadPoolExecutor(len(asks)) as pool:
        first = pool.submit(ask, asks[0])
        while not batches and queue.status()["running"] == 0:
            threading.Event().wait(0.01)
        rest = [pool.submit(ask, item) for item in asks[1:]]
        while queue.waiting_images() < len(asks) - 1:
            threading.Event().wait(0.01)
        gate.set()
        bodies = [first.result(), *[future.result() for future in rest]]

    kinds = [sorted({(task, strength) for task, strength, _ in batch}) for batch in batches]
    assert all(len(kind) == 1 for kind in kinds), batches  # no batch mixes tasks or strengths
    assert sorted(sorted(prompt for _, _, prompt in batch) for batch in batches[1:]) == [
        ["edit 0"], ["edit 0"], ["edit 0"], ["edit 0", "edit 1", "edit 2"]], batches  # the three 0.5 img2img together
    assert len(batches) == 5, batches
    for (name, _, body, settings), answer in zip(asks, bodies):
        expected = library(models.mini, body["prompt"], 40, width=32, height=32, **settings)[0]
        assert np.array_equal(pixels(answer["images"][0]), expected), name


def test_progress_of_an_edit_counts_the_steps_it_runs(server, client, monkeypatch):
    """strength 0.5 of 4 steps runs 2: progress reaches 2 of 2 (1.0), and A1111's job says img2img."""
    queue, seen, original = server.state.queue, [], server.state.queue._checker

    def checker(name):
        check = original(name)

        def watched(step, steps):
            check(step, steps)
            if step == steps:  # the last step, seen from the client while the batch runs
                seen.append((step, steps, httpx.get(server.url + "/sdapi/v1/progress", timeout=30).json()))

        return watched

    monkeypatch.setattr(queue, "_checker", checker)
    img2img(client, prompt="x", init_images=[b64(noise(9))], denoising_strength=0.5, seed=1)
    [(step, steps, progress)] = seen
    assert (step, steps) == (2, 2) and progress["progress"] == 1.0 and progress["state"]["job"] == "img2img"


# -- records without --out, gallery variations ------------------------------------------------------

def test_without_an_output_folder_the_record_says_pil_image(models):
    from fastapi.testclient import TestClient

    app = create_app([models.mini], limits=LIMITS)
    with TestClient(app) as client:
        response = client.post("/sdapi/v1/img2img", json={"prompt": "a red circle", "init_images": [b64(noise(5))],
                                                          "seed": 1, "steps": STEPS})
        assert response.status_code == 200, response.text
        with Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))) as image:
            record = json.loads(image.text["genkit"])
        store = app.state.genkit.store
        assert record["image"] == "<PIL image>" and len(record["image_sha256"]) == 64
        assert not list(store.out.glob("input-*.png"))


def test_a_gallery_variation_of_an_edit_uses_its_kept_input(server, client, models):
    source, mask = noise(6), right_half()
    body = img2img(client, prompt="a purple edit", init_images=[b64(source)], mask=b64(mask), seed=8,
                   denoising_strength=0.6)
    name = json.loads(body["info"])["files"][0]
    variation = client.post(f"/genkit/v1/images/{name}/variation")
    assert variation.status_code == 200, variation.text
    made = variation.json()["images"][0]
    assert made["record"]["image"].startswith("input-") and made["record"]["mask"].startswith("mask-")
    assert made["record"]["strength"] == 0.6 and made["seed"] != 8
    expected = library(models.mini, "a purple edit", made["seed"], image=source, mask=mask, strength=0.6)[0]
    assert np.array_equal(pixels(client.get(made["url"]).content), expected)


def test_a_family_without_editing_is_refused_naming_the_input_field(tmp_path):
    from fastapi.testclient import TestClient

    import genkit
    from genkit.testing import build_tiny

    pixart = genkit.load(str(build_tiny("pixart-sigma", tmp_path / "pixart", seed=0)), device="cpu")
    with TestClient(create_app([pixart], limits=LIMITS)) as client:
        a1111 = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64(noise(0))]})
        assert a1111.status_code == 422 and a1111.json()["field"] == "init_images", a1111.text
        assert "families with it" in a1111.json()["detail"]
        masked = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64(noise(0))],
                                                        "mask": b64(right_half())})
        assert masked.status_code == 422 and masked.json()["field"] == "mask", masked.text
        edit = client.post("/v1/images/edits", files={"image": ("a.png", encode(noise(0)), "image/png")},
                           data={"prompt": "x"})
        assert edit.status_code == 422 and edit.json()["error"]["param"] == "image", edit.text


# -- bad input --------------------------------------------------------------------------------------

def _big_header() -> str:
    return b64(Image.new("RGB", (600, 8)))


BAD = [  # (body, status, field, words in the message)
    ({"prompt": "x", "init_images": ["not base64!"]}, 422, "init_images.0", "base64"),
    ({"prompt": "x", "init_images": [base64.b64encode(b"not an image").decode()]}, 422, "init_images.0", "PNG"),
    ({"prompt": "x"}, 422, "init_images", "one input image"),
    ({"prompt": "x", "init_images": [b64(noise(0))] * 2}, 422, "init_images", "got 2"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "denoising_strength": 0}, 422, "denoising_strength", "(0, 1]"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "denoising_strength": 1.5}, 422, "denoising_strength", "(0, 1]"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "denoising_strength": "high"}, 422, "denoising_strength", ""),
    ({"prompt": "x", "init_images": [b64(noise(0))], "denoising_strength": 0.1, "steps": 4}, 422,
     "denoising_strength", "no denoising step"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "mask": b64(right_half((16, 16)))}, 422, "mask", "16x16"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "mask": b64(Image.new("L", SIZE))}, 422, "mask", "nothing"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "mask": "%%%"}, 422, "mask", "base64"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "mask": b64(right_half()), "mask_blur": 4}, 422, "mask_blur",
     "mask_blur 0"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "mask": b64(right_half()), "mask_blur": 4,
      "inpaint_full_res": True, "inpainting_fill": 0}, 422, "mask_blur", "inpaint_full_res true"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "resize_mode": 1}, 422, "resize_mode", "resize_mode 0"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "inpainting_mask_invert": 2}, 422, "inpainting_mask_invert",
     "0 or 1"),
    ({"prompt": "x", "init_images": [_big_header()]}, 422, "init_images.0", "at most 512"),
    ({"prompt": "x", "init_images": [b64(noise(0, (128, 96)))]}, 422, "init_images", "128x96"),
    ({"prompt": "x", "init_images": [b64(noise(0))], "width": 19}, 422, "width", "multiple"),
    ({"prompt": "x", "restore_faces": True}, 422, "restore_faces", "face restoration"),
]


@pytest.mark.parametrize("body, status, field, words", BAD, ids=[f"bad-{i}" for i in range(len(BAD))])
def test_bad_img2img_requests_get_4xx_naming_the_field(client, body, status, field, words):
    route = "txt2img" if "init_images" not in body and "restore_faces" in body else "img2img"
    response = client.post(f"/sdapi/v1/{route}", json={"steps": STEPS, **body})
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["field"] == field and words in answer["detail"], answer
    assert "Traceback" not in response.text


def test_defaults_of_unsupported_fields_pass_and_mask_fields_without_a_mask_are_inert(client, models):
    source = noise(7)
    body = img2img(client, prompt="x", init_images=[b64(source)], seed=2, resize_mode=0, mask_blur=4,
                   inpaint_full_res=True, inpainting_fill=0, inpaint_full_res_padding=32, mask_round=True,
                   include_init_images=True, enable_hr=False, restore_faces=False, tiling=False, image_cfg_scale=1.5)
    assert body["parameters"]["init_images"] == [b64(source)]
    assert np.array_equal(pixels(body["images"][0]), library(models.mini, "x", 2, image=source, strength=0.75)[0])


BAD_EDITS = [  # (files, data, status, field)
    ({}, {"prompt": "x"}, 400, "image"),
    ({"image": ("a.png", b"not a png", "image/png")}, {"prompt": "x"}, 400, "image"),
    ({"image": ("a.png", encode(noise(0)), "image/png")}, {}, 400, "prompt"),
    ({"image": ("a.png", encode(noise(0)), "image/png")}, {"prompt": "x", "n": "two"}, 400, "n"),
    ({"image": ("a.png", encode(noise(0)), "image/png")}, {"prompt": "x", "strength": "2"}, 422, "strength"),
    ({"image": ("a.png", encode(noise(0)), "image/png")}, {"prompt": "x", "size": "big"}, 400, "size"),
    ({"image": ("a.png", encode(noise(0)), "image/png")}, {"prompt": "x", "loras": "[oops"}, 400, "loras"),
    ({"image": ("a.png", encode(noise(0)), "image/png"), "mask": ("m.png", b"", "image/png")}, {"prompt": "x"}, 400,
     "mask"),
    ({"image": ("a.png", encode(noise(0)), "image/png"),
      "mask": ("m.png", encode(Image.new("RGBA", SIZE, (0, 0, 0, 255))), "image/png")}, {"prompt": "x"}, 400,
     "mask"),
    ({"image": ("a.png", encode(noise(0, (320, 320))), "image/png")}, {"prompt": "x"}, 413, "body"),  # > 256 KiB
    ({"image": ("a.png", encode(noise(0)), "image/png"), "image[]": ("b.png", encode(noise(1)), "image/png")},
     {"prompt": "x"}, 400, "image"),
]


@pytest.mark.parametrize("files, data, status, field", BAD_EDITS, ids=[f"edit-{i}" for i in range(len(BAD_EDITS))])
def test_bad_edits_get_openais_error_object(client, files, data, status, field):
    response = client.post("/v1/images/edits", files=files or None, data=data)
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == field and answer["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in response.text
