"""The genkit app as Ray Serve replicas across a cluster, Ray's HTTP proxy in front (`pip install "genkit[ray]"`).

    from ray import serve
    from genkit.serve.ray import deployment
    serve.run(deployment(["genkit-mini"], num_replicas=2, out="/shared/served"), name="genkit", route_prefix="/")

    genkit serve --ray [--replicas N] [--ray-address auto]      # the same from the command line

Each replica builds the app itself, `create_app(models, **kwargs)` when Ray starts it, so models load in the
replica and only their names travel; Ray runs the app's lifespan there (the queue, the jobs it resumes) and stops
it with the replica. One replica per GPU (`num_gpus: 1`) where the cluster has GPUs, else `num_cpus` each: the
cluster's cores divided among the replicas.

Where images go: replica r keeps its images, manifest.jsonl and jobs in `<out>/replica-<r>/`. One folder for all
collides: an ImageStore numbers images from its own manifest, so two replicas both start at the same index and two
images with the same index, seed and prompt get one name (the later file silently replaces the other); each
rewrites manifest.jsonl whole (every 1000 images and at exit) from what it read, dropping the other's newer lines;
and every replica would resume every job of the folder after a restart. A replica's rank is stable (one Ray starts
in place of a dead one takes its rank, so it finishes that folder's jobs), and replica r numbers its images from
r * INDEX_SPAN, so a file name is unique across the folders.

Whichever replica the proxy picks, requests about something one replica holds reach it: an image's entry, file or
variation and a job (GET, DELETE) are tried there first and, on a 404, asked of every replica
(`DeploymentHandle.broadcast`); the gallery's and the jobs' lists merge every replica's; A1111's options (the
current model), refresh-loras, interrupt and skip go to every replica. The rest is the picked replica's alone: its
queue (/sdapi/v1/progress, /genkit/v1/status, /metrics). Every answer names its replica in `X-Genkit-Replica`.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from urllib.parse import parse_qs

from genkit.errors import GenkitError

APP_NAME = "genkit"
INDEX_SPAN = 10**7  # images a replica numbers before the next replica's numbers (file names stay unique)
HEADER = b"x-genkit-replica"
FORWARDED = "genkit.forwarded"  # a scope key: this request came from another replica, answer it here
BODY_LIMIT = 1 << 20  # the most of a body held to forward (these routes take none, or a small JSON object)

OWNED = re.compile(r"^/genkit/v1/(files/[^/]+|images/[^/]+(/variation)?|jobs/[^/]+)$")  # held by one replica
MERGED = {"/genkit/v1/images": ("images", "time", "file"), "/genkit/v1/jobs": ("jobs", "created", "id")}  # GET
EVERY = frozenset({"/sdapi/v1/options", "/sdapi/v1/refresh-loras", "/sdapi/v1/interrupt", "/sdapi/v1/skip"})  # POST


def require() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise GenkitError('genkit serve --ray needs Ray Serve: pip install "genkit[ray]"') from None


def deployment(models=None, *, num_replicas: int | None = None, ray_actor_options: dict | None = None,
               max_ongoing_requests: int | None = None, name: str = APP_NAME, access_log: bool = False,
               **create_app_kwargs):
    """A Ray Serve application (a bound deployment) whose replicas each serve `create_app(models,
    **create_app_kwargs)`. `models`: names, folders or hub ids (each replica loads its own). Default: one replica
    per GPU of the cluster with `{"num_gpus": 1}`, else one replica with the cluster's CPUs; with `num_replicas`
    on CPUs, each replica gets the cluster's CPUs divided among them and as many torch threads (`ray.init` first,
    else one CPU each). `max_ongoing_requests` (default the queue's bound + 32) must let a replica hold enough
    requests to batch. `access_log`: each replica writes genkit's JSON access lines to its stderr."""
    require()
    from ray import serve

    from genkit.serve.limits import Limits

    num_replicas, ray_actor_options = placement(num_replicas, ray_actor_options)
    # the replicas' working folders are not this process's: folders travel as absolute paths
    if create_app_kwargs.get("out") is not None:
        create_app_kwargs["out"] = str(Path(create_app_kwargs["out"]).resolve())
    if create_app_kwargs.get("lora_dirs"):
        create_app_kwargs["lora_dirs"] = [str(Path(folder).resolve()) for folder in create_app_kwargs["lora_dirs"]]
    limits = create_app_kwargs.get("limits") or Limits()
    queue = create_app_kwargs.get("max_queue") or limits.max_queue
    replica = serve.deployment(serve.ingress()(Replica), name=name, num_replicas=num_replicas,
                               ray_actor_options=ray_actor_options,
                               max_ongoing_requests=max_ongoing_requests or queue + 32,
                               logging_config={"enable_access_log": not access_log})  # genkit's lines, not both
    return replica.bind(_names(models), create_app_kwargs, access_log)


def build(args: dict):
    """`serve run genkit.serve.ray:build models=genkit-mini num_replicas=2 out=/shared/served` (or a Serve config
    file's `import_path`): `deployment` from the arguments Ray passes (strings on the command line)."""
    args = dict(args)
    models = args.pop("models", None)
    if isinstance(models, str):
        models = models.split(",")
    if "num_replicas" in args:
        args["num_replicas"] = int(args["num_replicas"])
    return deployment(models, **args)


def run(models=None, *, host: str = "127.0.0.1", port: int = 7860, replicas: int | None = None,
        address: str | None = None, **create_app_kwargs) -> None:
    """`genkit serve --ray`: join the Ray cluster at `address` (None: start one on this machine), start Ray's
    HTTP proxy on host:port, deploy, and serve until Ctrl-C or SIGTERM; then the app is deleted (and a cluster
    started here stopped)."""
    import signal
    import sys
    import time

    require()
    import ray
    from ray import serve

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: also while the replicas load
    ray.init(address=address, logging_level="WARNING")  # the replicas' logs print here, as uvicorn's would
    try:
        serve.start(http_options={"host": host, "port": port})
        count, _ = placement(replicas)
        app = deployment(models, num_replicas=count, access_log=True, **create_app_kwargs)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica failed to start: its traceback is above, from its log
            raise GenkitError(f"the replicas did not start: {str(exc).splitlines()[0]} (their error is above)") \
                from None
        where = f"[{host}]" if ":" in host else host
        print(f"genkit serve: http://{where}:{port} through Ray Serve, {count} replica{'s' * (count > 1)} "
              f"(gallery at /, A1111 at /sdapi/v1, OpenAI at /v1; Ctrl-C stops)", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if serve.status().applications.get(APP_NAME) is not None:
            serve.delete(APP_NAME)
        if address is None:
            serve.shutdown()
            ray.shutdown()


def placement(num_replicas: int | None = None, ray_actor_options: dict | None = None) -> tuple[int, dict]:
    """How many replicas, and what each asks of Ray: one per GPU of the cluster with a GPU each, else one (or
    `num_replicas`) with the cluster's CPUs divided among them."""
    gpus, cpus = _cluster()
    if num_replicas is None:
        num_replicas = gpus or 1
    if num_replicas < 1:
        raise GenkitError(f"num_replicas must be at least 1, got {num_replicas}", param="num_replicas")
    if ray_actor_options is None and gpus:
        ray_actor_options = {"num_gpus": 1}
    elif ray_actor_options is None:  # torch's threads: the replica's cores, whatever this process's OMP_NUM_THREADS
        share = max(1, cpus // num_replicas)
        ray_actor_options = {"num_cpus": share, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(share)}}}
    return num_replicas, ray_actor_options


def _cluster() -> tuple[int, int]:
    """(GPUs, CPUs) of the Ray cluster this process is connected to; (0, 1) when it is not."""
    import ray

    if not ray.is_initialized():
        return 0, 1
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)), int(resources.get("CPU", 1))


def _names(models) -> list[str] | None:
    if models is None:
        return None
    if isinstance(models, (str, Path)) or hasattr(models, "plan"):
        models = [models]
    for model in models:
        if hasattr(model, "plan"):
            raise GenkitError("deployment takes model names, folders or hub ids (each replica loads its own), got a "
                              "loaded Pipeline", param="models")
    return [str(Path(model).resolve()) if Path(model).exists() else str(model) for model in models]


def number_from(store, first: int) -> None:
    """Make `store` number its images from `first` on, unless its folder's manifest is already past it (a restarted
    replica). Through `store.next_index` only: the index it hands out now is dropped."""
    start = store.next_index()
    if start < first:
        take, shift = store.next_index, first - start - 1
        store.next_index = lambda: take() + shift


class Replica:
    """One replica: the app, built when Ray starts the replica; `forwarded` answers other replicas' requests."""

    def __init__(self, models, create_app_kwargs: dict, access_log: bool = False):
        self.models, self.kwargs, self.access_log = models, create_app_kwargs, access_log
        self.rank, self.genkit_app, self.handle = None, None, None  # not `app`: Ray's wrapper has one

    async def __serve_build_asgi_app__(self):
        """Ray calls this once the replica is placed, before the app's lifespan starts (the queue, the jobs)."""
        from ray import serve

        from genkit.serve.app import create_app

        context = serve.get_replica_context()
        self.rank = getattr(context.rank, "rank", context.rank)
        self.handle = serve.get_deployment_handle(context.deployment, context.app_name)
        kwargs = dict(self.kwargs)
        if kwargs.get("out") is not None:
            kwargs["out"] = str(Path(kwargs["out"]) / f"replica-{self.rank}")
        if self.access_log:
            from genkit.serve.metrics import log_access_to_stderr

            log_access_to_stderr()
        self.genkit_app = await asyncio.to_thread(create_app, self.models, **kwargs)  # the loop stays free to answer Ray
        if self.rank:
            number_from(self.genkit_app.state.genkit.store, self.rank * INDEX_SPAN)
        self.genkit_app.add_middleware(Spread, replica=self)
        return self.genkit_app

    async def forwarded(self, request: dict) -> dict:
        """Answer a request another replica passes on (see `Spread`): status, headers, body and this replica."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "root_path": "",
                 "raw_path": request["path"].encode(), FORWARDED: True,
                 **{key: request[key] for key in ("method", "scheme", "path", "query_string", "headers", "server",
                                                  "client")}}
        return {"replica": self.rank, **await _call(self.genkit_app, scope, request["body"])}

    async def everywhere(self, request: dict) -> list[dict]:
        """Every replica's answer to `request` (a replica that fails to answer is left out)."""
        answers = await self.handle.broadcast("forwarded", request).results_async(return_exceptions=True)
        return [answer for answer in answers if isinstance(answer, dict)]


class Spread:
    """ASGI middleware (outermost) that sends a request to the replicas it concerns, by its route: OWNED ones here
    first, then to every replica on a 404; MERGED lists from every replica; EVERY settings to every replica."""

    def __init__(self, app, replica: Replica):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._named(send)
        kind = None if scope.get(FORWARDED) else route_kind(scope["method"], scope["path"])
        if kind is None:
            return await self.app(scope, receive, send)
        body, complete = await _read(receive, BODY_LIMIT)
        if not complete:  # too large to hold: this replica's own answer (its Guard bounds the body)
            return await self.app(scope, _replay(body, receive), send)
        request = {"method": scope["method"], "scheme": scope.get("scheme", "http"), "path": scope["path"],
                   "query_string": scope.get("query_string", b""), "headers": list(scope.get("headers", [])),
                   "server": scope.get("server"), "client": scope.get("client"), "body": body}
        if kind == "owned":
            answer = await self.replica.forwarded(request)
            if answer["status"] == 404:
                answer = next((a for a in await self.replica.everywhere(request) if a["status"] != 404), answer)
        else:
            answers = await self.replica.everywhere(request) or [await self.replica.forwarded(request)]
            mine = next((a for a in answers if a["replica"] == self.replica.rank), answers[0])
            answer = merge(answers, mine, request) if kind == "merged" else mine
        await send({"type": "http.response.start", "status": answer["status"], "headers": answer["headers"]})
        await send({"type": "http.response.body", "body": answer["body"]})

    def _named(self, send):
        async def named(message):
            if message["type"] == "http.response.start" and not any(k == HEADER for k, _ in message["headers"]):
                message = {**message, "headers": [*message.get("headers", []), (HEADER, str(self.replica.rank).encode())]}
            await send(message)
        return named


def route_kind(method: str, path: str) -> str | None:
    """"owned", "merged", "every" or None (this replica alone), for a request's method and path."""
    if method == "POST" and path in EVERY:
        return "every"
    if method == "GET" and path in MERGED:
        return "merged"
    if method in ("GET", "POST", "DELETE") and OWNED.match(path):
        return "owned"
    return None


def merge(answers: list[dict], mine: dict, request: dict) -> dict:
    """One list answer from every replica's: the entries of all, newest first, up to the request's `limit`; the
    other keys (models, LoRAs) from this replica's answer. A refusal (not 200: a bad query, no key) is passed on."""
    key, newest, identity = MERGED[request["path"]]
    if any(answer["status"] != 200 for answer in answers):
        return next(answer for answer in answers if answer["status"] != 200)
    query = parse_qs(request["query_string"].decode("latin-1"))
    limit = int(query.get("limit", ["100"])[0])
    seen, entries = set(), []
    for answer in answers:
        for entry in json.loads(answer["body"])[key]:
            if entry.get(identity) not in seen:
                seen.add(entry.get(identity))
                entries.append(entry)
    entries.sort(key=lambda entry: entry.get(newest) or 0, reverse=True)
    body = json.dumps({**json.loads(mine["body"]), key: entries[:limit]}).encode()
    headers = [(k, v) for k, v in mine["headers"] if k.lower() != b"content-length"]
    return {**mine, "headers": [*headers, (b"content-length", str(len(body)).encode())], "body": body}


async def _read(receive, limit: int) -> tuple[bytes, bool]:
    """The request's body, up to `limit` bytes: (what was read, whether that is all of it)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body"):
            return b"".join(chunks), True
        if size > limit:
            return b"".join(chunks), False


def _replay(body: bytes, receive):
    """A `receive` that gives `body` (read already) as one message, then the rest of the request's."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": True}
        return await receive()
    return replay


async def _call(app, scope: dict, body: bytes) -> dict:
    """Run one request through an ASGI app here: its status, headers and body. The client never hangs up."""
    sent, answer, chunks = False, {"status": 500, "headers": []}, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a disconnect watcher's receive: cancelled, never answered

    async def send(message):
        if message["type"] == "http.response.start":
            answer.update(status=message["status"], headers=list(message.get("headers", [])))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return {**answer, "body": b"".join(chunks)}
