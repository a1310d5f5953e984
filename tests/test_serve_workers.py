"""genkit serve with several workers: CPU worker processes (`--workers 2`), pixels equal to one worker's, and a
worker that dies fails only its batch's requests, is started again, and serves after."""

from __future__ import annotations

import base64
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from genkit.serve import Limits, create_app  # noqa: E402
from genkit.serve.runner import Background  # noqa: E402

LIMITS = Limits(max_side=256, max_images=8, max_steps=50, max_queue=32, max_batch=1)


def body(seed: int, steps: int = 4) -> dict:
    colour = ("red", "orange", "yellow", "green", "blue", "purple")[seed % 6]
    return {"prompt": f"a {colour} circle on the left", "seed": seed, "steps": steps, "width": 64, "height": 64,
            "cfg_scale": 5}


def pixels(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_ready(app, timeout=180.0):
    queue = app.state.genkit.queue
    deadline = time.monotonic() + timeout
    while not queue.ready():
        assert time.monotonic() < deadline, queue.status()["workers"]
        time.sleep(0.1)


@pytest.mark.slow
def test_two_cpu_workers_share_the_requests_with_the_pixels_of_one(tiny_mini, tmp_path, one_thread):
    seeds = list(range(6))
    single = Background(create_app([str(tiny_mini)], out=tmp_path / "one", limits=LIMITS, device="cpu"))
    url = single.start()
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            alone = {seed: pixels(client.post("/sdapi/v1/txt2img", json=body(seed)).json()) for seed in seeds}
    finally:
        single.stop()

    app = create_app([str(tiny_mini)], out=tmp_path / "two", limits=LIMITS, devices=["cpu"], workers=2, threads=1)
    server = Background(app)
    url = server.start()
    try:
        wait_ready(app)
        with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(len(seeds)) as pool:
            answers = list(pool.map(lambda s: client.post("/sdapi/v1/txt2img", json=body(s)), seeds))
        status = app.state.genkit.queue.status()
    finally:
        server.stop()
    assert [a.status_code for a in answers] == [200] * len(seeds)
    for seed, answer in zip(seeds, answers):
        assert np.array_equal(pixels(answer.json()), alone[seed]), f"seed {seed}"
    workers = {w["name"]: w for w in status["workers"]}
    assert set(workers) == {"0", "1"}
    assert all(w["images"] >= 1 for w in workers.values()), workers  # both made images
    assert sum(w["images"] for w in workers.values()) == len(seeds)


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_batch_is_restarted_and_serves_again(tiny_mini, tmp_path, one_thread):
    app = create_app([str(tiny_mini)], out=tmp_path, limits=LIMITS, devices=["cpu"], workers=2, threads=1)
    queue = app.state.genkit.queue
    worker = queue.workers[1]
    server = Background(app)
    url = server.start()
    try:
        wait_ready(app)
        first_pid = worker.process.pid
        with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.post, "/sdapi/v1/txt2img", json=body(seed, steps=40)) for seed in range(4)]
            deadline = time.monotonic() + 120
            while "1" not in queue.batches:  # worker 1 holds a batch: kill it mid-run
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(first_pid, signal.SIGKILL)
            answers = [f.result() for f in futures]
            codes = sorted(a.status_code for a in answers)
            assert codes.count(500) == 1 and codes.count(200) == 3, codes  # max_batch 1: one request was on it
            failed = next(a for a in answers if a.status_code == 500).json()
            assert "worker 1" in str(failed)
            assert "restarted" in str(failed)
            wait_ready(app)
            assert worker.process.pid != first_pid and worker.restarts == 1
            queue.workers[0].ready = lambda: False  # only the restarted worker may take the next batch
            again = client.post("/sdapi/v1/txt2img", json=body(9))
            assert again.status_code == 200
            assert queue.status()["workers"][1]["images"] >= 1
    finally:
        server.stop()
    assert not worker.process.is_alive()


def test_devices_are_checked_in_one_line():
    from click.testing import CliRunner

    from genkit.cli import main

    result = CliRunner().invoke(main, ["serve", "--devices", "gpu0", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "device 'gpu0'" in result.output and "--devices" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["serve", "--workers", "0", "--port", "0"])
    assert result.exit_code == 2 and "--workers must be at least 1" in result.output
