"""`create_app`: the ASGI app (FastAPI) that holds the models, the queue and the image store.

    app = create_app(["genkit-mini"])                 # names are loaded here; or pass loaded Pipelines
    app = create_app([pipeline], out="served", api_key="...", lora_dirs=["loras/"], cors=["http://localhost:3000"])

The worker thread starts with the app (its lifespan) and stops with it. Two apps must not share
one loaded Pipeline while both are generating: each has its own worker.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from genkit.serve.limits import Limits

log = logging.getLogger("genkit.serve")


@dataclass
class Server:
    """What the routes share (`request.app.state.genkit`)."""

    pool: object
    library: object
    store: object
    limits: Limits
    queue: object
    service: object
    api_key: str | None
    startup: list = field(default_factory=list)  # callables run once the queue has started (jobs: resume)
    shutdown: list = field(default_factory=list)  # callables run before the queue stops


def create_app(models=None, *, out: str | Path | None = None, api_key: str | None = None, lora_dirs=(),
               limits: Limits | None = None, max_batch: int | None = None, max_queue: int | None = None,
               cors=(), gather: float = 0.01, lora_cache: int = 2, device: str | None = None,
               dtype: str | None = None, attention: str = "auto", memory=None, devices=(), workers: int = 1,
               threads: int | None = None):
    """An app serving `models` (loaded Pipelines or names; default genkit-mini), the first one current; `memory`: the
    GPU memory each is planned for (genkit.load).

    `devices` (["cuda:0", "cuda:1"]) and `workers` (per device) start a worker per device and count: the first in
    this process, the others as processes (genkit.serve.workers); `threads`: each CPU worker's threads (default:
    the usable cores divided among the CPU workers)."""
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    from genkit.serve import a1111, errors, gallery, jobs, metrics, openai
    from genkit.serve.loras import LoraLibrary
    from genkit.serve.models import ModelPool
    from genkit.serve.queue import Coalescer
    from genkit.serve.security import Guard
    from genkit.serve.service import Service
    from genkit.serve.store import ImageStore

    limits = limits or Limits()
    limits = replace(limits, **{k: v for k, v in (("max_batch", max_batch), ("max_queue", max_queue)) if v})
    library = LoraLibrary(lora_dirs)
    places = [place for place in (list(devices) or [device]) for _ in range(max(1, workers))]
    threads = threads or _cpu_threads(places)
    if threads and len(places) > 1:
        from genkit.cpu import choose_threads

        choose_threads(threads)  # worker 0's share of the cores, before its models load
    pool = ModelPool(_load_all(models, places[0], dtype, attention, memory), lora_cache=lora_cache)
    store = ImageStore(out)
    queue = Coalescer(None, max_batch=limits.max_batch, max_queue=limits.max_queue, gather=gather)
    service = Service(pool, library, store, limits, queue)
    queue.run_batch, queue.deliver = service.run_batch, service.deliver
    if len(places) > 1:
        queue.add_workers(_workers(pool, places[1:], threads, service.numbered, lora_cache))

    @asynccontextmanager
    async def lifespan(app):
        queue.start()
        for hook in server.startup:
            hook()
        try:
            yield
        finally:
            for hook in server.shutdown:
                hook()
            queue.stop()
            store.close()

    app = FastAPI(title="genkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.genkit = server = Server(pool, library, store, limits, queue, service, api_key)
    errors.install(app)
    app.include_router(a1111.router)
    app.include_router(openai.router)
    app.include_router(gallery.router)
    jobs.install(app, server)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["*"], allow_headers=["*"])
    metrics.install(app, server)  # its access log and counts outermost: a 401 or 413 is logged and counted too
    return app


def _cpu_threads(places: list) -> int | None:
    """With several CPU workers, each one's share of the usable cores (at least 1)."""
    cpu = [place for place in places if (place or "cpu").startswith("cpu")]
    if len(cpu) < 2 and not (cpu and len(places) > 1):
        return None
    from genkit.cpu import usable_cores

    return max(1, usable_cores() // len(cpu))


def _workers(pool, places: list, threads, numbered, lora_cache: int) -> list:
    """Worker processes for `places`, loading the served models as worker 0 loaded them."""
    from genkit.serve.workers import ProcessWorker, WorkerSpec

    first = pool.get(pool.current)
    with warnings.catch_warnings():  # settings() plans a placeholder prompt, which genkit-mini warns is no shape
        warnings.simplefilter("ignore")
        settings = first.settings()
    exact = {"exact": settings["exact"]} if "exact" in settings else {}
    models = tuple(pipeline.name for pipeline in pool.served.values())
    return [ProcessWorker(str(n), WorkerSpec(models, device=place, dtype=settings.get("dtype"),
                                             attention=settings.get("attention", "auto"),
                                             memory=getattr(first, "memory_budget", None),
                                             threads=threads if (place or "cpu").startswith("cpu") else None,
                                             lora_cache=lora_cache, settings=exact), prepare=numbered)
            for n, place in enumerate(places, start=1)]


def _load_all(models, device, dtype, attention, memory=None, **settings) -> list:
    import genkit
    from genkit import presets

    if models is None or isinstance(models, (str, Path)) or hasattr(models, "plan"):
        models = [models]
    loaded = []
    for model in models:
        if hasattr(model, "plan"):
            loaded.append(model)
        else:
            log.info("loading %s", model or presets.DEFAULT_MODEL)
            loaded.append(genkit.load(None if model is None else str(model), device=device, dtype=dtype,
                                      attention=attention, memory=memory, **settings))
    return loaded
