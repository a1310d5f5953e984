"""genkit on Ray Serve (genkit.serve.ray): a local Ray cluster started here (2 CPUs, no dashboard, its own temporary
folder) runs two replicas of the app (tiny genkit-mini and tiny SD, one CPU each) behind Ray's HTTP proxy on a free
port. Both dialects' images equal the plain app's (create_app under uvicorn in this process) for the same bodies;
both replicas answer; the gallery, its files, variations and jobs reach the replica that holds them whichever one
the proxy picks; A1111's options reach every replica; shutting down stops the replicas and frees the port.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
try:
    import ray
    from ray import serve
except ImportError as exc:  # the one reason to skip: Ray is not installed here (pip install "genkit[ray]")
    print(f"tests/test_serve_ray.py skipped: ray cannot be imported ({exc})")
    pytest.skip(f"ray cannot be imported ({exc}); pip install 'genkit[ray]'", allow_module_level=True)

from PIL import Image  # noqa: E402

from genkit.serve import Limits, create_app  # noqa: E402
from genkit.serve.ray import INDEX_SPAN, deployment  # noqa: E402
from genkit.serve.runner import Background  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster starts: about 40 s on two cores

STEPS = 4
LIMITS = Limits(max_side=128, max_images=8, max_steps=50, max_body_bytes=256 * 1024, max_queue=16)
PROMPTS = [("a red circle", 11), ("a blue square", 12), ("a green triangle", 13), ("a red square", 14),
           ("a purple circle", 15), ("a yellow triangle", 16), ("a blue circle", 17), ("an orange square", 18)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pixels(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):
        data = base64.b64decode(data)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def plain(tiny_mini, tiny_sd, tmp_path_factory):
    """The same app as one plain server in this process: what the replicas must match."""
    background = Background(create_app([str(tiny_mini), str(tiny_sd)], out=tmp_path_factory.mktemp("plain"),
                                       limits=LIMITS, gather=0.05, device="cpu"))
    yield background.start()
    background.stop()


@pytest.fixture(scope="module")
def cluster(tiny_mini, tiny_sd, tmp_path_factory):
    out, port = tmp_path_factory.mktemp("served"), free_port()
    temp = tempfile.mkdtemp(prefix="genkit-ray-", dir="/tmp")  # Ray's socket paths must stay short
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, object_store_memory=128 << 20,
             logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment([tiny_mini, tiny_sd], num_replicas=2, out=out, limits=LIMITS, gather=0.05, device="cpu")
        serve.run(app, name="genkit", route_prefix="/")
        print(f"Ray cluster and 2 replicas ready in {time.monotonic() - started:.1f} s")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", out=out, port=port)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def client(cluster):
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        yield client


def at_once(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    def post(body):
        with httpx.Client(base_url=url, timeout=120) as client:
            return client.post(path, json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, bodies))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return answers


def replica_of(answer: httpx.Response) -> str:
    return answer.headers["x-genkit-replica"]


def test_both_dialects_through_the_proxy_make_the_plain_apps_images(cluster, plain):
    a1111 = [{"prompt": prompt, "seed": seed, "steps": STEPS, "width": 32, "height": 32} for prompt, seed in PROMPTS]
    served, alone = at_once(cluster.url, "/sdapi/v1/txt2img", a1111), at_once(plain, "/sdapi/v1/txt2img", a1111)
    assert {replica_of(answer) for answer in served} == {"0", "1"}, "one replica answered every request"
    for mine, theirs in zip(served, alone):
        assert np.array_equal(pixels(mine.json()["images"][0]), pixels(theirs.json()["images"][0]))
    info = json.loads(served[0].json()["info"])
    assert info["all_seeds"] == [PROMPTS[0][1]]

    openai = [{"prompt": prompt, "seed": seed, "n": 2, "size": "32x32", "steps": STEPS, "response_format": fmt}
              for (prompt, seed), fmt in zip(PROMPTS[:4], ("b64_json", "url") * 2)]
    served, alone = at_once(cluster.url, "/v1/images/generations", openai), at_once(plain, "/v1/images/generations",
                                                                                  openai)
    with httpx.Client(timeout=60) as client:
        def image(item):  # a url names the server that made it: Ray's proxy, or the plain server
            return pixels(item["b64_json"] if "b64_json" in item else client.get(item["url"]).content)

        for mine, theirs in zip(served, alone):
            assert len(mine.json()["data"]) == 2
            for a, b in zip(mine.json()["data"], theirs.json()["data"]):
                assert np.array_equal(image(a), image(b))


def test_gallery_files_variations_and_jobs_reach_the_replica_that_holds_them(cluster, client):
    from genkit.outputs import read_record

    folders = sorted(path.name for path in cluster.out.iterdir())
    assert folders == ["replica-0", "replica-1"]
    made = {path.name: path for folder in folders for path in (cluster.out / folder).glob("*.png")}
    assert len(made) == len(list(cluster.out.glob("*/*.png"))), "two replicas' files share a name"
    assert all(int(name.split("-")[0]) >= INDEX_SPAN for name in made if name in
               {p.name for p in (cluster.out / "replica-1").glob("*.png")})
    assert read_record(next(iter(made.values())))["threads"] == 1  # num_cpus 1: one torch thread per replica

    answers = [client.get("/genkit/v1/images", params={"limit": 1000}) for _ in range(4)]
    assert {replica_of(answer) for answer in answers} == {"0", "1"}
    for answer in answers:  # every replica lists every replica's images, newest first
        entries = answer.json()["images"]
        assert {entry["file"] for entry in entries} == set(made)
        assert [e["time"] for e in entries] == sorted((e["time"] for e in entries), reverse=True)
    assert len(client.get("/genkit/v1/images", params={"limit": 3}).json()["images"]) == 3
    for name, path in made.items():  # each file, its entry, from whichever replica the proxy picks
        for _ in range(2):
            assert client.get(f"/genkit/v1/files/{name}").content == path.read_bytes()
            assert client.get(f"/genkit/v1/images/{name}").json()["record"]["seed"] == read_record(path)["seed"]
    assert client.get("/genkit/v1/files/00000-1-nothing.png").status_code == 404

    held_by_1 = next(name for name in made if made[name].parent.name == "replica-1")
    variation = client.post(f"/genkit/v1/images/{held_by_1}/variation")
    assert variation.status_code == 200, variation.text
    assert variation.headers["x-genkit-replica"] == "1" and len(variation.json()["images"]) == 1

    jobs = [client.post("/genkit/v1/jobs", json={"prompt": prompt, "seed": seed, "steps": STEPS, "width": 32,
                                                   "height": 32}) for prompt, seed in PROMPTS[:4]]
    assert all(job.status_code == 202 for job in jobs), [job.text for job in jobs]
    ids, polled_by = {job.json()["id"] for job in jobs}, set()
    deadline = time.monotonic() + 120
    for job in jobs:
        while True:
            answer = client.get(job.json()["url"])
            assert answer.status_code == 200, answer.text
            polled_by.add(replica_of(answer))
            if answer.json()["state"] == "done":
                break
            assert answer.json()["state"] in ("queued", "running") and time.monotonic() < deadline
            time.sleep(0.2)
        url = answer.json()["images"][0]["url"]
        assert client.get(url).status_code == 200
    assert polled_by == {"0", "1"}
    listed = [client.get("/genkit/v1/jobs").json()["jobs"] for _ in range(3)]
    assert all(ids <= {job["id"] for job in jobs} for jobs in listed)
    assert client.delete("/genkit/v1/jobs/" + "0" * 32).status_code == 404
    assert len(list(cluster.out.glob("*/jobs/*.json"))) == 4


def test_a1111_options_reach_every_replica(client):
    titles = [model["title"] for model in client.get("/sdapi/v1/sd-models").json()]
    try:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd"}).status_code == 200
        answers = [client.get("/sdapi/v1/options") for _ in range(8)]
        assert {replica_of(answer) for answer in answers} == {"0", "1"}
        assert {answer.json()["sd_model_checkpoint"] for answer in answers} == {titles[1]}
        bad = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
        assert bad.status_code == 422 and bad.json()["field"] == "sd_model_checkpoint"
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[0]})
    assert {client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] for _ in range(4)} == {titles[0]}


def test_shutdown_stops_the_replicas_and_frees_the_port(cluster):
    serve.shutdown()
    ray.shutdown()
    with pytest.raises(httpx.ConnectError):
        httpx.get(cluster.url + "/genkit/v1/status", timeout=5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", cluster.port))
    for folder in cluster.out.iterdir():  # each replica's store closed: its manifest rewritten whole, in order
        lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
        assert [line["index"] for line in lines] == sorted(line["index"] for line in lines)
        assert {line["file"] for line in lines} == {path.name for path in folder.glob("*.png")}
