"""genkit serve over real HTTP: a uvicorn server on a free localhost port, tiny models, 4 steps.

One server (two tiny models, a LoRA folder, an output folder) is shared by the module; images
are compared pixel for pixel with the engine's own (`Pipeline.generate`) and with the CLI's run
(`run_generate`), alone and coalesced with other requests' images.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from genkit.serve import Limits, create_app  # noqa: E402
from genkit.serve.runner import Background  # noqa: E402

STEPS = 4
LIMITS = Limits(max_side=256, max_images=8, max_steps=50, max_body_bytes=64 * 1024, max_queue=16)


@pytest.fixture(scope="module")
def models(tiny_mini, tiny_sd):
    import genkit

    return SimpleNamespace(mini=genkit.load(str(tiny_mini), device="cpu"), sd=genkit.load(str(tiny_sd), device="cpu"))


@pytest.fixture(scope="module")
def lora_dir(models, tmp_path_factory):
    """A LoRA for the tiny genkit-mini model: random adapters on its attention projections."""
    import torch
    from safetensors.torch import save_file

    generator, tensors = torch.Generator().manual_seed(0), {}
    for name, module in models.mini.pipe.unet.named_modules():
        if name.endswith(("to_q", "to_v")) and isinstance(module, torch.nn.Linear):
            tensors[f"unet.{name}.lora.down.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.5
            tensors[f"unet.{name}.lora.up.weight"] = torch.randn(module.out_features, 2, generator=generator) * 0.5
    folder = tmp_path_factory.mktemp("loras")
    save_file(tensors, str(folder / "star.safetensors"))
    return folder


def serving(app, out):
    """Run `app` on a free localhost port for a fixture: yields what the tests use of it."""
    background = Background(app)
    url = background.start()
    yield SimpleNamespace(url=url, app=app, out=out, state=app.state.genkit)
    background.stop()


@pytest.fixture(scope="module")
def server(models, lora_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    yield from serving(create_app([models.mini, models.sd], out=out, lora_dirs=[lora_dir], limits=LIMITS,
                                  gather=0.05), out)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def pixels(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):
        data = base64.b64decode(data)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def alone(pipeline, prompt: str, seed: int, n: int = 1, **settings) -> list[np.ndarray]:
    """The engine's images for this prompt and seed, made in a batch of their own."""
    settings.setdefault("num_inference_steps", STEPS)
    result = pipeline.generate([prompt], seed=seed, num_images_per_prompt=n, batch_size=n, **settings)
    return [np.asarray(image) for image in result.images]


def txt2img(client, **body):
    body.setdefault("steps", STEPS)
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- A1111 ---------------------------------------------------------------------------------------

def test_txt2img_answers_as_a1111_and_records_as_the_cli(server, client, models, tmp_path):
    from genkit.outputs import read_record
    from genkit.run import GenerateRequest, run_generate

    body = txt2img(client, prompt="a red circle", negative_prompt="blue", seed=5, batch_size=2, cfg_scale=3.5,
                   sampler_name="Euler a")
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 3.5 and info["steps"] == STEPS
    assert info["infotexts"][0].startswith("a red circle\nNegative prompt: blue\nSteps: 4, Sampler: Euler a")
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["seed"] == 5

    # the PNG is the file on disk, with both chunks, and its record is the CLI's
    files = [server.out / name for name in info["files"]]
    assert [f.read_bytes() for f in files] == [base64.b64decode(image) for image in body["images"]]
    with Image.open(files[1]) as image:
        assert image.text["parameters"] == info["infotexts"][1]
    record = read_record(files[1])
    assert (record["seed"], record["scheduler"], record["guidance_scale"]) == (6, "euler-a", 3.5)
    manifest = [json.loads(line) for line in (server.out / "manifest.jsonl").read_text().splitlines()]
    assert {f.name for f in files} <= {line["file"] for line in manifest}

    # same pixels as the engine alone and as `genkit generate` (its run_generate) with the same settings
    settings = dict(negative_prompt="blue", guidance_scale=3.5, scheduler="euler-a")
    served = [pixels(image) for image in body["images"]]
    for mine, engine in zip(served, alone(models.mini, "a red circle", 5, n=2, **settings)):
        assert np.array_equal(mine, engine)
    request = GenerateRequest(prompts=["a red circle"], out=tmp_path, seed=5, num_images_per_prompt=2,
                              num_inference_steps=STEPS, progress=False, **settings)
    cli = sorted(record["file"] for record in run_generate(request, pipeline=models.mini))
    for mine, name in zip(served, cli):
        assert np.array_equal(mine, pixels((tmp_path / name).read_bytes()))


def test_coalesced_images_equal_the_images_made_alone(server, models):
    prompts = [(f"a {colour} square", seed) for colour, seed in
               (("red", 1), ("blue", 2), ("green", 3), ("yellow", 4), ("purple", 5), ("orange", 6))]
    before = server.state.queue.stats["shared_batches"]

    def ask(prompt_seed):
        prompt, seed = prompt_seed
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return txt2img(client, prompt=prompt, seed=seed)

    with ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(ask, prompts))
    assert server.state.queue.stats["shared_batches"] > before, "no batch held images of two requests"
    for (prompt, seed), body in zip(prompts, bodies):
        assert np.array_equal(pixels(body["images"][0]), alone(models.mini, prompt, seed)[0]), prompt


def test_models_options_samplers_schedulers_loras(server, client):
    titles = [model["title"] for model in client.get("/sdapi/v1/sd-models").json()]
    assert [Path(t).name for t in titles] == ["tiny-mini", "tiny-sd"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[0]
    samplers = {entry["name"] for entry in client.get("/sdapi/v1/samplers").json()}
    assert {"DPM++ 2M", "Euler a", "Euler", "DDIM", "UniPC"} <= samplers
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic"]
    assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["star"]
    try:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[1]
        body = txt2img(client, prompt="a cat", seed=1, width=32, height=32)
        assert json.loads(body["info"])["sd_model_name"] == titles[1] and pixels(body["images"][0]).shape == (32, 32, 3)
        bad = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
        assert bad.status_code == 422 and bad.json()["field"] == "sd_model_checkpoint"
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[0]})
    override = txt2img(client, prompt="a cat", seed=1, width=32, height=32,
                       override_settings={"sd_model_checkpoint": "tiny-sd"})
    assert json.loads(override["info"])["sd_model_name"] == titles[1]


def test_loras_by_prompt_tag_and_by_field_make_the_clis_image(server, client, models, lora_dir):
    import genkit
    from genkit import lora

    tagged = txt2img(client, prompt="a red circle <lora:star:0.8>", seed=3)
    fielded = txt2img(client, prompt="a red circle", seed=3, loras=[{"name": "star", "weight": 0.8}])
    record = json.loads(tagged["info"])
    assert record["all_prompts"] == ["a red circle"] and 'Lora: "star: 0.8"' in record["infotexts"][0]
    with_lora = genkit.load(str(models.mini.name), device="cpu")
    lora.apply(with_lora, [lora.parse_spec(f"{lora_dir / 'star.safetensors'}:0.8")])
    expected = alone(with_lora, "a red circle", 3)[0]
    assert np.array_equal(pixels(tagged["images"][0]), expected)
    assert np.array_equal(pixels(fielded["images"][0]), expected)
    assert not np.array_equal(expected, alone(models.mini, "a red circle", 3)[0])
    for prompt in ("a red circle <lora:../star:1>", "a red circle <lora:/etc/passwd:1>"):
        response = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": STEPS})
        assert response.status_code == 422 and "unknown LoRA" in response.json()["detail"]


# -- OpenAI --------------------------------------------------------------------------------------

def test_openai_client_generates_and_errors_in_openais_shape(server, models):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [Path(m.id).name for m in client.models.list().data] == ["tiny-mini", "tiny-sd"]
    result = client.images.generate(model="tiny-mini", prompt="a blue triangle", n=2, size="16x16",
                                    response_format="b64_json", extra_body={"seed": 7, "steps": STEPS})
    expected = alone(models.mini, "a blue triangle", 7, n=2)
    assert [np.array_equal(pixels(d.b64_json), e) for d, e in zip(result.data, expected)] == [True, True]
    url = client.images.generate(prompt="a blue triangle", response_format="url", extra_body={"seed": 7, "steps": STEPS})
    assert np.array_equal(pixels(httpx.get(url.data[0].url).content), expected[0])
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="big")
    assert bad.value.param == "size" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="x", model="dall-e-3")
    assert missing.value.code == "model_not_found"


# -- bad input -----------------------------------------------------------------------------------

def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD = [  # (path, body, status, field)
    ("/sdapi/v1/txt2img", b"{not json", 400, "body"),
    ("/sdapi/v1/txt2img", [1, 2], 422, "body"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "abc"}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": True}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, 422, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DPM++ 2M Karras"}, 422, "scheduler"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 17}, 422, "width"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 4096}, 422, "width"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 3}, 422, "batch_size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 51}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -1}, 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": -5}, 422, "seed"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": NaN}', 400, "body"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": 1e400}', 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 1000}, 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", b"[" * 60000, 400, "body"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "loras": [{"name": "star", "weight": 11}]}, 422, "loras"),
    ("/sdapi/v1/txt2img", {"prompt": ""}, 422, "prompt"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "loras": [{"name": "nope"}]}, 422, "loras"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}, 422,
     "override_settings.sd_model_checkpoint"),
    ("/sdapi/v1/txt2img", {"prompt": "x" * 70000}, 413, "body"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not base64!"]}, 422, "init_images.0"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [_png()], "denoising_strength": 0}, 422,
     "denoising_strength"),
    ("/v1/images/generations", {"prompt": "x", "n": "2"}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, 422, "n"),
    ("/v1/images/generations", {"prompt": "x", "size": "4096x4096"}, 422, "size"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "gif"}, 400, "response_format"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path, body, status, field", BAD, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, *_) in
                                                                  enumerate(BAD)])
def test_bad_requests_get_4xx_naming_the_field(client, path, body, status, field):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    answer = response.json()
    if path.startswith("/v1/"):
        assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["param"] == field
    else:
        assert answer["field"] == field and answer["detail"]
    assert "Traceback" not in response.text


def test_variations_and_unknown_routes_answer_in_the_dialect(client):
    response = client.post("/v1/images/variations", files={"image": ("a.png", base64.b64decode(_png()), "image/png")})
    assert response.status_code == 501 and response.json()["error"]["code"] == "not_implemented"
    assert client.post("/v1/images/edits", data={"prompt": "x"}).json()["error"]["param"] == "image"
    assert client.get("/v1/nothing").json()["error"]["message"].startswith("no route")
    assert client.get("/sdapi/v1/nothing").status_code == 404
    assert client.get("/genkit/v1/files/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_a_crash_inside_a_batch_fails_that_batch_and_the_server_goes_on(server, client, models, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("the denoiser fell over")

    monkeypatch.setitem(models.mini.pipe.unet.__dict__, "forward", boom)
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": STEPS})
    assert response.status_code == 500 and "the denoiser fell over" in response.json()["detail"]
    assert "Traceback" not in response.text
    monkeypatch.undo()
    assert len(txt2img(client, prompt="a red circle", seed=1)["images"]) == 1


# -- queue, disconnects, interrupt, progress --------------------------------------------------------

def test_full_queue_429_disconnect_frees_slots_interrupt_stops_the_running_batch(server, client, models,
                                                                                 monkeypatch):
    queue, gate, unet = server.state.queue, threading.Event(), models.mini.pipe.unet
    original = unet.forward

    def held(*args, **kwargs):
        gate.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setitem(unet.__dict__, "forward", held)
    monkeypatch.setattr(queue, "max_queue", 3)
    results = {}

    def ask(name, **body):
        with httpx.Client(base_url=server.url, timeout=120) as own:
            results[name] = own.post("/sdapi/v1/txt2img", json={"steps": STEPS, **body})

    def until(condition):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, queue.status()
            time.sleep(0.02)

    try:
        running = threading.Thread(target=ask, args=("running",), kwargs={"prompt": "a red circle", "seed": 1})
        running.start()
        until(lambda: queue.status()["running"] == 1)
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == STEPS

        # a client that sends a request for 3 images and hangs up
        raw = json.dumps({"prompt": "a blue circle", "batch_size": 3, "steps": STEPS}).encode()
        gone = socket.create_connection(server.url.removeprefix("http://").split(":"))
        gone.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        until(lambda: queue.waiting_images() == 3)
        full = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": STEPS})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1 and full.json()["error"]
        gone.close()
        until(lambda: queue.waiting_images() == 0)  # its jobs were dropped

        waiting = threading.Thread(target=ask, args=("waiting",), kwargs={"prompt": "a green circle", "seed": 2})
        waiting.start()
        until(lambda: queue.waiting_images() == 1)
        assert client.post("/sdapi/v1/interrupt").status_code == 200
    finally:
        gate.set()
    running.join(60)
    waiting.join(60)
    stopped = results["running"].json()
    assert results["running"].status_code == 200 and stopped["images"] == [] and json.loads(stopped["info"])[
        "interrupted"]
    assert len(results["waiting"].json()["images"]) == 1  # the interrupt reached the running batch only


def test_coalescer_groups_by_key_in_arrival_order():
    from genkit.serve.queue import Coalescer, Ticket

    batches = []

    def run_batch(key, jobs, check):
        check(1, 1)
        batches.append((key, list(jobs)))
        return [job * 10 for job in jobs]

    queue = Coalescer(run_batch, max_batch=3, max_queue=10, gather=0)
    tickets = [queue.submit(Ticket("a", [1, 2])), queue.submit(Ticket("b", [3])), queue.submit(Ticket("a", [4, 5]))]
    queue.start()
    assert [t.future.result(10).outputs for t in tickets] == [[10, 20], [30], [40, 50]]
    queue.stop()
    assert batches == [("a", [1, 2, 4]), ("b", [3]), ("a", [5])]


# -- security --------------------------------------------------------------------------------------

def test_api_key_on_every_route_and_cors_only_when_asked(server, models):
    openai = pytest.importorskip("openai")
    app = create_app([models.mini], api_key="s3cret", cors=["http://example.test"], limits=LIMITS)
    background = Background(app)
    url = background.start()
    try:
        assert httpx.get(url + "/sdapi/v1/sd-models").status_code == 401
        assert httpx.get(url + "/genkit/v1/images").status_code == 401
        assert httpx.get(url + "/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/sdapi/v1/sd-models", auth=("anyone", "s3cret")).status_code == 200
        assert httpx.get(url + "/v1/models").json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/sdapi/v1/img2img", json={"prompt": "x"}).status_code == 401
        edit = httpx.post(url + "/v1/images/edits", files={"image": ("a.png", base64.b64decode(_png()), "image/png")},
                          data={"prompt": "x"})
        assert edit.status_code == 401 and edit.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/").status_code == 200  # the page alone: it asks for the key
        assert openai.OpenAI(base_url=url + "/v1", api_key="s3cret").models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
        allowed = httpx.options(url + "/sdapi/v1/txt2img", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "http://example.test"
    finally:
        background.stop()
    assert "access-control-allow-origin" not in httpx.options(server.url + "/sdapi/v1/txt2img", headers=preflight).headers
    assert httpx.get(server.url + "/sdapi/v1/sd-models").status_code == 200  # no key set: no auth


def test_public_bind_without_a_key_refuses_to_start_and_help_stays_light():
    from genkit.serve.security import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    env = {k: v for k, v in __import__("os").environ.items() if k != "GENKIT_API_KEY"}
    refused = subprocess.run([sys.executable, "-m", "genkit", "serve", "--host", "0.0.0.0"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("Error: refusing to listen on 0.0.0.0 without an API key")
    assert len(refused.stderr.strip().splitlines()) == 1
    light = subprocess.run([sys.executable, "-c", "import sys; from genkit.cli import main; "
                            "print('serve' in main.commands, 'fastapi' in sys.modules, 'torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert light.stdout.split() == ["True", "False", "False"], light.stderr


# -- gallery JSON, replay ----------------------------------------------------------------------------

def test_gallery_json_lists_newest_first_filters_and_makes_a_variation(server, client):
    made = txt2img(client, prompt="a purple zebra circle", seed=42)
    first = json.loads(made["info"])["files"][0]
    listing = client.get("/genkit/v1/images").json()["images"]
    assert listing[0]["file"] == first and [e["time"] for e in listing] == sorted((e["time"] for e in listing),
                                                                                 reverse=True)
    found = client.get("/genkit/v1/images", params={"q": "zebra 42"}).json()["images"]
    assert [e["file"] for e in found] == [first] and found[0]["record"]["seed"] == 42
    assert client.get(f"/genkit/v1/images/{first}").json()["infotext"].startswith("a purple zebra circle")
    assert client.get(f"/genkit/v1/files/{first}").content == base64.b64decode(made["images"][0])
    variation = client.post(f"/genkit/v1/images/{first}/variation").json()["images"][0]
    assert variation["prompt"] == "a purple zebra circle" and variation["seed"] != 42
    assert (variation["steps"], variation["model"]) == (STEPS, found[0]["model"])
    assert client.get("/", headers={"accept": "text/html"}).text.startswith("<!doctype html>")
    status = client.get("/genkit/v1/status").json()
    assert status["queue"]["batches"] >= 1 and status["queue"]["waiting"] == 0 and status["max_batch"] == 8


def test_a_served_image_replays_identically(server, client):
    from genkit.run import replay_image

    made = txt2img(client, prompt="a green circle", seed=9, sampler_name="DDIM")
    path, identical = replay_image(server.out / json.loads(made["info"])["files"][0], out=server.out / "replays")
    assert identical and path.is_file()
