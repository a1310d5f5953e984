"""Operations: health and readiness probes, Prometheus metrics, and one JSON access-log line per request.

    GET /healthz   200 {"status": "ok"} while the process serves; no API key (orchestrators probe it)
    GET /readyz    200 once every worker has its models loaded, else 503 naming the workers that have not;
                   no API key
    GET /metrics   Prometheus' text format through prometheus-client; behind the API key when one is set
                   (Prometheus sends it as `authorization: {credentials: KEY}`)

Each app has a `CollectorRegistry` of its own, never prometheus-client's global one, so several apps in one
process (tests, benchmarks) keep their own counts. What the queue holds now (waiting and running images, each
worker's busy time, batches, liveness) is read from `queue.status()` when Prometheus scrapes; finished batches
are counted as they end, through the queue's observers; requests by `AccessLog`, the ASGI middleware that also
writes one JSON line per request to the logger `genkit.serve.access`:

    {"method": "POST", "path": "/genkit/v1/jobs/{id}", "status": 200, "seconds": 0.0123, "client": "10.0.0.7",
     "bytes_sent": 512, "request_id": "3f2a..."}

`path` is the route's template when a route took the request (one metrics series per route, not per job or file),
the raw path otherwise. Bodies, query strings and headers are never logged, so neither prompts nor the API key
are. A request's id is the client's `X-Request-ID` when it is a short token, else a new one; the response carries
it back. Without prometheus-client the probes and the log still work and /metrics answers 501.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genkit.serve.errors import ApiError

log = logging.getLogger("genkit.serve")
access = logging.getLogger("genkit.serve.access")

OUTCOMES = ("ok", "failed", "stopped")  # a batch's, as the queue's observers are told
UNMATCHED = "<unmatched>"  # the route label of requests no route took: their raw paths would make a series each
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a client's X-Request-ID we repeat (in the log, in headers)
# seconds, from a probe (ms) to a large batch on a CPU (minutes); sizes up to the largest --max-batch we expect
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SIZES = (1, 2, 4, 8, 16, 32, 64)


def install(app, server) -> None:
    """The probes and /metrics on `app`, the access-log middleware, and a batch observer on `server.queue`."""
    metrics = Metrics.create(server)
    app.state.metrics = metrics  # None without prometheus-client
    router = APIRouter()

    @router.get("/healthz")
    async def healthz():  # on the event loop: it answers while the loop does, which is what it reports
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz():
        if not server.queue.ready():
            waiting = [w["name"] for w in server.queue.status()["workers"] if not w["ready"]]
            raise ApiError(503, f"not ready: worker(s) {', '.join(waiting) or '?'} still loading models",
                           code="not_ready")
        return {"status": "ready"}

    @router.get("/metrics")
    def scrape(request: Request):
        if metrics is None:
            raise ApiError(501, "GET /metrics needs prometheus-client, which is not installed: "
                                "pip install 'genkit[serve]'", code="not_implemented")
        body, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    app.include_router(router)
    app.add_middleware(AccessLog, metrics=metrics)


def log_access_to_stderr() -> None:
    """`genkit serve`: the access log's JSON lines on stderr, one a line (a library user configures logging)."""
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


class Metrics:
    """One app's registry: requests (from `AccessLog`), batches (from the queue's observer), and `QueueCollector`."""

    def __init__(self, server):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("genkit_requests", "HTTP requests by route template, method and status code",
                                ["route", "method", "status"], registry=registry)
        self.request_seconds = Histogram("genkit_request_seconds", "Seconds from a request's arrival to its "
                                         "response's last byte, by route template and method",
                                         ["route", "method"], buckets=SECONDS, registry=registry)
        self.batch_images = Histogram("genkit_batch_images", "Images per engine batch", buckets=SIZES,
                                      registry=registry)
        self.batch_requests = Histogram("genkit_batch_requests", "Requests whose images shared an engine batch "
                                        "(over 1: coalesced)", buckets=SIZES, registry=registry)
        self.batch_seconds = Histogram("genkit_batch_seconds", "Seconds a worker spent on one engine batch",
                                       buckets=SECONDS, registry=registry)
        self.batches = Counter("genkit_batches", "Engine batches by outcome", ["outcome"], registry=registry)
        self.images = Counter("genkit_images", "Images by their batch's outcome (ok, failed, stopped)",
                              ["outcome"], registry=registry)
        for outcome in OUTCOMES:  # every outcome from the start: a rate over a series that is not there is no alert
            self.batches.labels(outcome)
            self.images.labels(outcome)
        registry.register(QueueCollector(server))
        server.queue.observers.append(self.observe)

    @classmethod
    def create(cls, server) -> Metrics | None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            log.warning("prometheus-client is not installed: GET /metrics answers 501 (pip install 'genkit[serve]')")
            return None
        return cls(server)

    def observe(self, event: str, **fields) -> None:
        """The queue's observer: after each batch, (worker, images, requests, seconds, outcome)."""
        if event != "batch":
            return
        self.batch_images.observe(fields["images"])
        self.batch_requests.observe(fields["requests"])
        self.batch_seconds.observe(fields["seconds"])
        self.batches.labels(fields["outcome"]).inc()
        self.images.labels(fields["outcome"]).inc(fields["images"])

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (Prometheus' text format, or OpenMetrics)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class QueueCollector:
    """The queue and the models as they are when Prometheus scrapes: one `queue.status()` a scrape."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        queue, pool = self.server.queue, self.server.pool
        status = queue.status()
        for name, doc, value in (
                ("genkit_queue_waiting_images", "Images waiting for a worker", status["waiting"]),
                ("genkit_queue_running_images", "Images in the batches running now", status["running"]),
                ("genkit_queue_max_images", "Images that may wait (--max-queue); past it requests get 429",
                 queue.max_queue),
                ("genkit_queue_requests", "Requests with images waiting or running", status["requests"]),
                ("genkit_ready", "1 when every worker has its models loaded (GET /readyz answers 200)",
                 int(queue.ready()))):
            yield GaugeMetricFamily(name, doc, value=value)

        workers = status["workers"]
        for kind, name, doc, value in (
                (GaugeMetricFamily, "genkit_worker_busy", "1 while the worker runs a batch", "busy"),
                (GaugeMetricFamily, "genkit_worker_alive", "1 while the worker (thread or process) is alive", "alive"),
                (GaugeMetricFamily, "genkit_worker_ready", "1 once the worker has its models loaded", "ready"),
                (CounterMetricFamily, "genkit_worker_busy_seconds", "Seconds the worker spent running batches",
                 "seconds"),
                (CounterMetricFamily, "genkit_worker_batches", "Batches the worker ran, whatever their outcome",
                 "batches"),
                (CounterMetricFamily, "genkit_worker_images", "Images the worker made in batches that finished",
                 "images")):
            family = kind(name, doc, labels=["worker"])
            for worker in workers:
                family.add_metric([worker["name"]], float(worker[value]))
            yield family

        models = GaugeMetricFamily("genkit_model_info", "The served models (1 each); current: requests that name "
                                   "none get it", labels=["model", "current"])
        for model in pool.names():
            models.add_metric([model, str(model == pool.current).lower()], 1)
        yield models


class AccessLog:
    """ASGI middleware: counts and times each request, and logs it as one JSON line on `genkit.serve.access`."""

    def __init__(self, app, *, metrics: Metrics | None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id, for the routes
        response = {"status": 500, "bytes": 0, "done": False}  # 500: the app raised before it answered

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                response["bytes"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    # counted before the last byte leaves: a client that scrapes next sees its own request
                    self._record(scope, response, time.perf_counter() - started, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self._record(scope, response, time.perf_counter() - started, request_id)

    def _record(self, scope, response: dict, seconds: float, request_id: str) -> None:
        if response["done"]:
            return
        response["done"] = True
        route = getattr(scope.get("route"), "path", None)
        if self.metrics is not None:
            self.metrics.request(route or UNMATCHED, scope["method"], response["status"], seconds)
        if access.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access.info(json.dumps({"method": scope["method"], "path": route or scope["path"],
                                    "status": response["status"], "seconds": round(seconds, 6),
                                    "client": client[0] if client else None, "bytes_sent": response["bytes"],
                                    "request_id": request_id}))


def _request_id(scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex
