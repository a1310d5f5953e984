"""Jobs that outlive a connection (genkit.serve.jobs): accepted at once, polled, cancelled, kept in `<out>/jobs/`.

A uvicorn server on a free localhost port holds the tiny genkit-mini model; a job's images are compared pixel for
pixel with the same body sent to the dialect's own route, and jobs are carried over restarts: an app stopped before
its jobs ran, a job file left `running` by a killed server, and a real `genkit serve` process killed with SIGKILL
mid-run and started again, whose images must equal the engine's own for the seeds fixed at acceptance.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from genkit.serve import Limits, create_app  # noqa: E402
from genkit.serve.runner import Background  # noqa: E402

STEPS = 4
LIMITS = Limits(max_side=128, max_images=8, max_steps=50, max_body_bytes=256 * 1024, max_queue=16)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini(tiny_mini):
    import genkit

    return genkit.load(str(tiny_mini), device="cpu")


class Served:
    """An app on a free localhost port, and a client for it."""

    def __init__(self, app, out):
        self.app, self.out, self.state = app, out and Path(out), app.state.genkit
        self.background = Background(app)
        self.url = self.background.start()
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def stop(self):
        self.client.close()
        self.background.stop()


@pytest.fixture(scope="module")
def server(mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("served-jobs")
    served = Served(create_app([mini], out=out, limits=LIMITS, gather=0.05), out)
    yield served
    served.stop()


@pytest.fixture
def client(server):
    return server.client


def pixels(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):
        data = base64.b64decode(data)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def until(condition, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.02)
    return result


def submit(client, body: dict, **params) -> dict:
    response = client.post("/genkit/v1/jobs", json=body, params=params)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == job["url"] and job["url"].endswith(f"/genkit/v1/jobs/{job['id']}")
    return job


def finished(client, job_id: str, timeout: float = 60.0) -> dict:
    def poll():
        job = client.get(f"/genkit/v1/jobs/{job_id}").json()
        return job if job["state"] not in ("queued", "running") else None

    return until(poll, timeout, f"job {job_id}")


def job_pixels(client, job: dict) -> list[np.ndarray]:
    return [pixels(client.get(httpx.URL(image["url"]).path).content) for image in job["images"]]  # this server's


def engine(pipeline, prompt: str, seed: int, n: int = 1, **settings) -> list[np.ndarray]:
    """The engine's images for this prompt and seed, made in a batch of their own (an unbroken run's pixels)."""
    settings.setdefault("num_inference_steps", STEPS)
    result = pipeline.generate([prompt], seed=seed, num_images_per_prompt=n, batch_size=n, **settings)
    return [np.asarray(image) for image in result.images]


def job_files(out: Path) -> dict:
    folder = out / "jobs"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}


def same(got: list, expected: list) -> bool:
    return len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def held(state, monkeypatch):
    """Keep the queue's workers from taking any batch (requests wait) until the monkeypatch is undone."""
    for worker in state.queue.workers:
        monkeypatch.setattr(worker, "ready", lambda: False)


# -- submit, poll, done --------------------------------------------------------------------------------

def test_a_txt2img_job_is_accepted_at_once_and_done_with_the_routes_pixels(server, client):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 7, "batch_size": 2, "steps": STEPS,
            "cfg_scale": 3.5, "sampler_name": "Euler a"}
    job = submit(client, body)
    assert job["api"] == "txt2img" and job["state"] in ("queued", "running") and job["seeds"] == [7, 8]
    assert job["progress"]["images"] == 2

    done = finished(client, job["id"])
    assert done["state"] == "done" and done["error"] is None and done["progress"]["images_done"] == 2
    assert done["created"] <= done["started"] <= done["finished"]
    assert [image["seed"] for image in done["images"]] == [7, 8]
    assert [image["record"]["scheduler"] for image in done["images"]] == ["euler-a"] * 2
    assert all((server.out / image["file"]).is_file() for image in done["images"])

    direct = client.post("/sdapi/v1/txt2img", json=body).json()
    assert same(job_pixels(client, done), [pixels(image) for image in direct["images"]])

    kept = job_files(server.out)[job["id"]]
    assert kept["state"] == "done" and [image["file"] for image in kept["images"]] == \
        [image["file"] for image in done["images"]]
    assert any(j["id"] == job["id"] for j in client.get("/genkit/v1/jobs").json()["jobs"])
    assert [j["id"] for j in client.get("/genkit/v1/jobs", params={"state": "done", "limit": 1}).json()["jobs"]] \
        == [client.get("/genkit/v1/jobs").json()["jobs"][0]["id"]]


def test_an_openai_body_with_a_random_seed_gets_its_seed_fixed_at_acceptance(server, client):
    job = submit(client, {"prompt": "a blue square", "n": 2, "size": "32x32", "steps": STEPS})
    assert job["api"] == "generations" and len(job["seeds"]) == 2 and job["seeds"][1] == job["seeds"][0] + 1
    kept = job_files(server.out)[job["id"]]
    assert kept["body"]["seed"] == job["seeds"][0]  # a rerun of the stored body makes the same images

    done = finished(client, job["id"])
    direct = client.post("/v1/images/generations", json={"prompt": "a blue square", "n": 2, "size": "32x32",
                                                         "steps": STEPS, "seed": job["seeds"][0]}).json()
    assert same(job_pixels(client, done), [pixels(item["b64_json"]) for item in direct["data"]])

    # ?api= decides over the keys
    named = submit(client, {"prompt": "a blue square", "steps": STEPS, "seed": 1}, api="generations")
    assert named["api"] == "generations" and finished(client, named["id"])["state"] == "done"


def test_an_img2img_job_is_the_routes_image(server, client):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    body = {"prompt": "a green triangle", "init_images": [base64.b64encode(buffer.getvalue()).decode()],
            "denoising_strength": 0.5, "seed": 3, "steps": STEPS}
    job = submit(client, body)
    assert job["api"] == "img2img"
    done = finished(client, job["id"])
    direct = client.post("/sdapi/v1/img2img", json=body).json()
    assert done["state"] == "done" and same(job_pixels(client, done), [pixels(direct["images"][0])])


@pytest.mark.parametrize("body, params, status, field", [
    ({"prompt": "x", "steps": "four"}, {}, 422, "steps"),  # A1111's answer
    ({"prompt": "x", "sampler_name": "nope"}, {}, 422, "sampler_name"),
    ({"prompt": "x", "batch_size": 100}, {}, 422, "batch_size"),
    ({"prompt": "x", "width": 100000}, {}, 422, "width"),
    ({"prompt": "x", "init_images": ["not an image"]}, {}, 422, "init_images.0"),
    ({"prompt": "x", "size": "big"}, {}, 400, "size"),  # OpenAI's answer
    ({"prompt": "x", "n": "two"}, {}, 400, "n"),
    ({"prompt": "x", "model": "nothing-here", "n": 1}, {}, 404, "model"),
    ({"n": 1}, {}, 400, "prompt"),
    ({"prompt": "x"}, {"api": "sd"}, 422, "api"),
    ([1, 2], {}, 422, "body"),
])
def test_a_bad_body_is_refused_at_once_as_its_dialect_would_and_kept_nowhere(server, client, body, params, status,
                                                                            field):
    before = set(job_files(server.out))
    response = client.post("/genkit/v1/jobs", json=body, params=params)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field and "Traceback" not in response.text
    assert set(job_files(server.out)) == before


# -- cancel, unknown ids, a full queue ----------------------------------------------------------------

def test_cancel_a_queued_job_unknown_ids_404_finished_409_full_queue_429(server, client, monkeypatch):
    queue = server.state.queue
    assert finished(client, submit(client, {"prompt": "a red circle", "steps": STEPS})["id"])["state"] == "done"
    held(server.state, monkeypatch)
    monkeypatch.setattr(queue, "max_queue", 3)
    before = set(job_files(server.out))
    waiting = submit(client, {"prompt": "a red circle", "batch_size": 2, "steps": STEPS})
    queued = client.get(waiting["url"]).json()
    assert queued["state"] == "queued" and queued["started"] is None
    # one batch of seconds_per_batch ahead (its two images), nothing running
    assert queued["progress"]["eta_seconds"] == pytest.approx(queue.seconds_per_batch(), abs=0.01)

    full = client.post("/genkit/v1/jobs", json={"prompt": "a red circle", "batch_size": 2, "steps": STEPS})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1 and full.json()["error"] == "queue_full"
    assert set(job_files(server.out)) - before == {waiting["id"]}  # the refused job left no file

    cancelled = client.delete(waiting["url"])
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert queue.waiting_images() == 0 and job_files(server.out)[waiting["id"]]["state"] == "cancelled"
    again = client.delete(waiting["url"])
    assert again.status_code == 409 and "already finished (cancelled)" in again.json()["detail"]
    assert waiting["id"] in [j["id"] for j in client.get("/genkit/v1/jobs", params={"state": "cancelled"}).json()[
        "jobs"]]

    for unknown in ("0" * 32, "not-an-id", "..%2F..%2Fmanifest", "A" * 32):
        assert client.get(f"/genkit/v1/jobs/{unknown}").status_code == 404
        assert client.delete(f"/genkit/v1/jobs/{unknown}").status_code == 404
    assert client.get("/genkit/v1/jobs", params={"state": "lost"}).status_code == 422


def held_unet(mini, monkeypatch) -> threading.Event:
    """The model's UNet waits at each call until the returned event is set (a batch that stays running)."""
    gate, unet = threading.Event(), mini.pipe.unet
    original = unet.forward

    def slow(*args, **kwargs):
        gate.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setitem(unet.__dict__, "forward", slow)
    return gate


def test_cancel_a_running_job_stops_it_and_it_stays_cancelled(server, client, mini, monkeypatch):
    gate = held_unet(mini, monkeypatch)
    try:
        job = submit(client, {"prompt": "a red circle", "steps": STEPS, "seed": 1})
        until(lambda: client.get(job["url"]).json()["state"] == "running", what="running")
        running = client.get(job["url"]).json()
        assert running["started"] is not None and running["progress"]["steps"] in (0, STEPS)
        assert client.delete(job["url"]).json()["state"] == "cancelled"
    finally:
        gate.set()
    until(lambda: server.state.queue.status()["running"] == 0, what="the batch to stop")
    time.sleep(0.3)  # the watcher's next looks
    after = client.get(job["url"]).json()
    assert after["state"] == "cancelled" and after["images"] == []


def test_an_interrupt_ends_a_running_job_cancelled_and_interrupted(server, client, mini, monkeypatch):
    gate = held_unet(mini, monkeypatch)
    try:
        job = submit(client, {"prompt": "a red circle", "steps": STEPS, "seed": 1})
        until(lambda: client.get(job["url"]).json()["state"] == "running", what="running")
        assert client.post("/sdapi/v1/interrupt").status_code == 200
    finally:
        gate.set()
    done = finished(client, job["id"])
    assert done["state"] == "cancelled" and done["interrupted"] and "interrupted" in done["error"]


def test_a_crash_inside_its_batch_fails_the_job_with_a_one_line_error(server, client, mini, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("the denoiser fell over")

    monkeypatch.setitem(mini.pipe.unet.__dict__, "forward", boom)
    job = finished(client, submit(client, {"prompt": "a red circle", "steps": STEPS})["id"])
    assert job["state"] == "failed" and job["error"] == "generation failed: RuntimeError: the denoiser fell over"
    assert job["finished"] is not None and job_files(server.out)[job["id"]]["state"] == "failed"
    assert client.delete(job["url"]).status_code == 409


# -- restarts -------------------------------------------------------------------------------------------

def test_jobs_survive_a_restart_queued_ones_and_one_a_killed_server_left_running(mini, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = Served(create_app([mini], out=out, limits=LIMITS), out)
    with monkeypatch.context() as patch:
        try:
            made = finished(first.client, submit(first.client, {"prompt": "a red circle", "seed": 5, "batch_size": 2,
                                                                "steps": STEPS})["id"])
            assert made["state"] == "done"
            held(first.state, patch)
            queued = [submit(first.client, {"prompt": "a blue square", "seed": -1, "batch_size": 2, "steps": STEPS}),
                      submit(first.client, {"prompt": "a green triangle", "n": 1, "steps": STEPS, "size": "32x32"})]
        finally:
            first.stop()  # before the queued jobs ran
    kept = job_files(out)
    assert [kept[job["id"]]["state"] for job in queued] == ["queued", "queued"]

    # a job a killed server left running, its first image already written: the restart makes only the second
    ran = dict(kept[made["id"]], id="f" * 32, state="running", finished=None, images=kept[made["id"]]["images"][:1])
    (out / "jobs" / f"{'f' * 32}.json").write_text(json.dumps(ran))
    # and one that cannot be made any more (its model is not served now): it fails, saying why
    gone = dict(kept[queued[1]["id"]], id="e" * 32, body={"prompt": "x", "model": "gone", "seed": 1}, seeds=[1])
    (out / "jobs" / f"{'e' * 32}.json").write_text(json.dumps(gone))
    (out / "jobs" / "notes.json").write_text("{}")  # not a job's name: left alone

    second = Served(create_app([mini], out=out, limits=LIMITS), out)
    try:
        resumed = [finished(second.client, job["id"]) for job in queued]
        assert [job["state"] for job in resumed] == ["done", "done"] and all(job["resumed"] == 1 for job in resumed)
        assert [job["seeds"] for job in resumed] == [job["seeds"] for job in queued]
        assert same(job_pixels(second.client, resumed[0]), engine(mini, "a blue square", queued[0]["seeds"][0], 2))
        assert same(job_pixels(second.client, resumed[1]),
                    engine(mini, "a green triangle", queued[1]["seeds"][0], width=32, height=32))

        half = finished(second.client, "f" * 32)
        assert half["state"] == "done" and half["images"][0]["file"] == made["images"][0]["file"]
        assert half["images"][1]["file"] != made["images"][1]["file"]  # made again, with the same pixels
        assert same(job_pixels(second.client, half), job_pixels(second.client, made))

        lost = second.client.get(f"/genkit/v1/jobs/{'e' * 32}").json()
        assert lost["state"] == "failed" and lost["error"].startswith("could not be resumed: model: model 'gone'")

        # the job done before the restart is still answered, with its images
        before = second.client.get(made["url"].replace(first.url, second.url)).json()
        assert before["state"] == "done" and before["images"] == [
            {**image, "url": image["url"].replace(first.url, second.url)} for image in made["images"]]
    finally:
        second.stop()


def test_without_an_out_folder_jobs_are_served_from_a_temporary_one(mini):
    served = Served(create_app([mini], limits=LIMITS), None)
    try:
        assert served.state.store.temporary
        job = finished(served.client, submit(served.client, {"prompt": "a red circle", "steps": STEPS})["id"])
        assert job["state"] == "done" and served.client.get(job["images"][0]["url"]).status_code == 200
        assert (served.state.store.out / "jobs" / f"{job['id']}.json").is_file()
    finally:
        served.stop()
    assert not served.state.store.out.exists()  # gone with the server: such jobs do not survive a restart


# -- a real server killed with SIGKILL -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(model: Path, out: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`genkit serve` as its own process (the same command as benchmarks/serve_jobs.py)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "genkit", "serve", "--model", str(model), "--port", str(port), "--out", str(out),
               "--max-batch", "2", "--max-queue", "64"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/genkit/v1/jobs", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("genkit serve did not start in 180 s")


@pytest.mark.slow
def test_a_server_killed_mid_run_and_restarted_finishes_every_job_with_the_same_pixels(mini, tiny_mini, tmp_path):
    out, log = tmp_path / "out", tmp_path / "serve.log"
    shapes = ("red circle", "blue square", "green triangle", "purple circle", "orange square", "yellow triangle")
    bodies = [{"prompt": f"a {shape}", "batch_size": 2, "steps": 8, "width": 32, "height": 32,
               **({"seed": 100 + 10 * i} if i % 2 else {})}  # every other one random: fixed at acceptance
              for i, shape in enumerate(shapes)]
    process, url = start_serve(tiny_mini, out, log)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            accepted = [submit(client, body) for body in bodies]

            def some_made():
                return sum(len(client.get(job["url"]).json()["images"]) for job in accepted)

            until(lambda: some_made() > 0, 120, "a first image")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    left = job_files(out)
    assert any(left[job["id"]]["state"] in ("queued", "running") for job in accepted), "nothing was left to resume"

    process, url = start_serve(tiny_mini, out, log)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            done = [finished(client, job["id"], 120) for job in accepted]
            assert [job["state"] for job in done] == ["done"] * len(bodies)
            for body, job in zip(bodies, done):
                assert same(job_pixels(client, job), engine(mini, body["prompt"], job["seeds"][0], 2,
                                                            num_inference_steps=8, width=32, height=32)), body
    finally:
        process.terminate()
        process.wait(30)
