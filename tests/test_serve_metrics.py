"""Operations over real HTTP: /healthz, /readyz, /metrics (read with prometheus-client's own parser) and the
access log, on tiny genkit-mini servers making real images.

Counts are compared as differences between two scrapes, so the tests hold in any order.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from genkit.serve import Limits, create_app  # noqa: E402
from genkit.serve.runner import Background  # noqa: E402

STEPS = 2
KEY = "metrics-s3cret"
LIMITS = Limits(max_side=256, max_images=4, max_steps=10, max_queue=12)


@pytest.fixture(scope="module")
def mini(tiny_mini):
    import genkit

    return genkit.load(str(tiny_mini), device="cpu")


def serving(app):
    background = Background(app)
    try:
        with httpx.Client(base_url=background.start(), timeout=120) as client:
            yield client, app.state.genkit
    finally:
        background.stop()


@pytest.fixture(scope="module")
def open_server(mini, tmp_path_factory):
    """No API key."""
    yield from serving(create_app([mini], out=tmp_path_factory.mktemp("open"), limits=LIMITS))


@pytest.fixture(scope="module")
def keyed_server(mini, tmp_path_factory):
    """An API key, and a second app in this process beside open_server."""
    yield from serving(create_app([mini], out=tmp_path_factory.mktemp("keyed"), limits=LIMITS, api_key=KEY))


AUTH = {"Authorization": f"Bearer {KEY}"}


def scrape(client, headers=None) -> dict:
    """Every sample of /metrics, parsed by prometheus-client: {(name, ((label, value), ...)): value}."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parser.text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def txt2img(client, headers=None, **body):
    return client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": STEPS, **body}, headers=headers)


# -- /metrics -------------------------------------------------------------------------------------

def test_metrics_count_images_batches_requests_and_workers(open_server):
    client, state = open_server
    before, status_before = scrape(client), state.queue.status()

    assert txt2img(client, batch_size=2, seed=1).status_code == 200
    assert txt2img(client, seed=3).status_code == 200
    assert txt2img(client, width=17).status_code == 422  # refused before the queue: no batch
    assert client.get("/sdapi/v1/sd-models").status_code == 200
    assert client.get("/no/such/route").status_code == 404
    assert client.get("/genkit/v1/images/nothing.png").status_code == 404
    after, status = scrape(client), state.queue.status()

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # images and batches, as the queue's observer saw them finish
    batches = status["batches"] - status_before["batches"]
    assert batches == 2  # one a request: sent one after the other, nothing to coalesce
    assert grew("genkit_images_total", outcome="ok") == 3
    assert grew("genkit_images_total", outcome="failed") == grew("genkit_images_total", outcome="stopped") == 0
    assert ("genkit_images_total", (("outcome", "failed"),)) in after  # every outcome is a series from the start
    assert grew("genkit_batches_total", outcome="ok") == batches
    assert grew("genkit_batch_images_count") == batches and grew("genkit_batch_images_sum") == 3
    assert grew("genkit_batch_images_bucket", le="1.0") == 1 and grew("genkit_batch_images_bucket", le="2.0") == 2
    assert grew("genkit_batch_requests_sum") == batches  # one request a batch
    assert grew("genkit_batch_seconds_count") == batches and grew("genkit_batch_seconds_sum") > 0

    # requests by route template, method and status code
    txt = {"route": "/sdapi/v1/txt2img", "method": "POST"}
    assert grew("genkit_requests_total", **txt, status="200") == 2
    assert grew("genkit_requests_total", **txt, status="422") == 1
    assert grew("genkit_requests_total", route="/sdapi/v1/sd-models", method="GET", status="200") == 1
    assert grew("genkit_requests_total", route="<unmatched>", method="GET", status="404") == 1
    assert grew("genkit_requests_total", route="/genkit/v1/images/{name}", method="GET", status="404") == 1
    assert grew("genkit_request_seconds_count", **txt) == 3 and grew("genkit_request_seconds_sum", **txt) > 0
    assert not any("nothing.png" in str(key) or "/no/such" in str(key) for key in after)  # templates, not paths
    # the first scrape is counted by the time the second is made
    assert grew("genkit_requests_total", route="/metrics", method="GET", status="200") >= 1

    # the queue now, and its worker
    assert value(after, "genkit_queue_waiting_images") == value(after, "genkit_queue_running_images") == 0
    assert value(after, "genkit_queue_max_images") == LIMITS.max_queue
    assert value(after, "genkit_ready") == 1
    worker = {"worker": "0"}
    assert grew("genkit_worker_batches_total", **worker) == batches
    assert grew("genkit_worker_images_total", **worker) == 3
    assert grew("genkit_worker_busy_seconds_total", **worker) > 0
    assert value(after, "genkit_worker_busy_seconds_total", **worker) == pytest.approx(status["workers"][0]["seconds"])
    assert value(after, "genkit_worker_alive", **worker) == value(after, "genkit_worker_ready", **worker) == 1
    assert value(after, "genkit_worker_busy", **worker) == 0
    assert value(after, "genkit_model_info", model=state.pool.current, current="true") == 1


def test_queue_length_is_read_when_scraped(open_server, monkeypatch):
    """Images wait while the worker is not ready; the gauge says how many, and /readyz says which worker."""
    client, state = open_server
    worker = state.queue.workers[0]
    monkeypatch.setattr(worker, "ready", lambda: False)  # the worker loading its models, as a process worker does
    answer = {}

    def send():
        with httpx.Client(base_url=str(client.base_url), timeout=120) as other:
            answer["response"] = txt2img(other, batch_size=3, seed=9)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            samples = scrape(client)
            if value(samples, "genkit_queue_waiting_images") == 3:
                break
            time.sleep(0.02)
        assert value(samples, "genkit_queue_waiting_images") == 3
        assert value(samples, "genkit_queue_requests") == 1
        assert value(samples, "genkit_ready") == value(samples, "genkit_worker_ready", worker="0") == 0
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["error"] == "not_ready"
        assert "worker(s) 0 still loading" in not_ready.json()["detail"]
        assert client.get("/healthz").status_code == 200  # alive all the same
    finally:
        monkeypatch.undo()  # ready again: the worker looks twice a second while images wait
        thread.join(120)
    assert answer["response"].status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    assert value(scrape(client), "genkit_queue_waiting_images") == 0


# -- probes and the API key -----------------------------------------------------------------------

def test_probes_need_no_key_and_metrics_keeps_it(open_server, keyed_server):
    for client, _ in (open_server, keyed_server):
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    keyed, _ = keyed_server
    refused = keyed.get("/metrics")
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_api_key"
    assert keyed.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert keyed.get("/sdapi/v1/sd-models").status_code == 401  # the probes alone are public
    assert value(scrape(keyed, AUTH), "genkit_ready") == 1
    assert value(scrape(open_server[0]), "genkit_ready") == 1  # no key set: no key asked


def test_two_apps_in_one_process_keep_their_own_counts(open_server, keyed_server):
    (open_client, _), (keyed_client, _) = open_server, keyed_server
    open_before, keyed_before = scrape(open_client), scrape(keyed_client, AUTH)
    assert txt2img(keyed_client, AUTH, seed=11).status_code == 200
    assert keyed_client.get("/healthz").status_code == 200
    open_after, keyed_after = scrape(open_client), scrape(keyed_client, AUTH)

    def grew(before, after, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for name, labels, keyed in (("genkit_images_total", {"outcome": "ok"}, 1),
                                ("genkit_batch_images_count", {}, 1),
                                ("genkit_worker_images_total", {"worker": "0"}, 1),
                                ("genkit_requests_total", {"route": "/healthz", "method": "GET", "status": "200"}, 1),
                                ("genkit_requests_total", {"route": "/sdapi/v1/txt2img", "method": "POST",
                                                           "status": "200"}, 1)):
        assert grew(keyed_before, keyed_after, name, **labels) == keyed, name
        assert grew(open_before, open_after, name, **labels) == 0, name


# -- the access log -------------------------------------------------------------------------------

def test_one_json_access_line_a_request_without_body_or_key(keyed_server, caplog):
    client, _ = keyed_server
    caplog.set_level(logging.INFO, logger="genkit.serve.access")
    refused = txt2img(client, {**AUTH, "X-Request-ID": "trace-42"}, prompt="a private prompt", width=17)
    assert refused.status_code == 422 and refused.headers["x-request-id"] == "trace-42"
    missing = client.get("/genkit/v1/images/nothing.png?q=hidden", headers=AUTH)
    assert missing.status_code == 404
    forged = 'x", "status": 200, "a": "'
    injected = client.get("/healthz", headers={"X-Request-ID": forged})  # not a short token: a new id
    assert injected.status_code == 200 and injected.headers["x-request-id"] != forged
    unauthorized = client.get("/metrics")  # the key check turns it away: still logged (the log is outermost)
    assert unauthorized.status_code == 401

    records = [r for r in caplog.records if r.name == "genkit.serve.access"]
    lines = [json.loads(r.getMessage()) for r in records]
    assert len(lines) == 4 and all(r.levelno == logging.INFO for r in records)
    first, second, third, fourth = lines
    assert fourth["status"] == 401 and fourth["path"] == "/metrics"
    assert set(first) == {"method", "path", "status", "seconds", "client", "bytes_sent", "request_id"}
    assert first["method"] == "POST" and first["path"] == "/sdapi/v1/txt2img" and first["status"] == 422
    assert first["request_id"] == "trace-42" and first["client"] == "127.0.0.1"
    assert first["bytes_sent"] == len(refused.content) and 0 < first["seconds"] < 60
    assert second["path"] == "/genkit/v1/images/{name}" and second["status"] == 404  # the template
    assert second["request_id"] == missing.headers["x-request-id"] and len(second["request_id"]) == 32
    assert third["request_id"] == injected.headers["x-request-id"]
    text = caplog.text + "".join(r.getMessage() for r in records)
    for secret in (KEY, "private prompt", "hidden", "nothing.png", "Bearer"):
        assert secret not in text, secret


# -- without prometheus-client --------------------------------------------------------------------

def test_without_prometheus_client_metrics_is_501_and_the_rest_works(mini, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client raises ImportError
    caplog.set_level(logging.INFO, logger="genkit.serve.access")
    app = create_app([mini], out=tmp_path, limits=LIMITS)
    assert app.state.metrics is None
    for client, _ in serving(app):
        metrics = client.get("/metrics")
        assert metrics.status_code == 501
        assert "pip install 'genkit[serve]'" in metrics.json()["detail"]
        assert len(metrics.json()["detail"].splitlines()) == 1
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert txt2img(client, seed=5).status_code == 200
    statuses = [json.loads(r.getMessage())["status"] for r in caplog.records if r.name == "genkit.serve.access"]
    assert statuses == [501, 200, 200, 200]
