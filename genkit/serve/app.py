"""`create_app`: the ASGI app (FastAPI) that holds the models, the queue and the image store.

    app = create_app(["genkit-mini"])                 # names are loaded here; or pass loaded Pipelines
    app = create_app([pipeline], out="served", api_key="...", lora_dirs=["loras/"], cors=["http://localhost:3000"])

The worker thread starts with the app (its lifespan) and stops with it. Two apps must not share
one loaded Pipeline while both are generating: each has its own worker.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
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


def create_app(models=None, *, out: str | Path | None = None, api_key: str | None = None, lora_dirs=(),
               limits: Limits | None = None, max_batch: int | None = None, max_queue: int | None = None,
               cors=(), gather: float = 0.01, lora_cache: int = 2, device: str | None = None,
               dtype: str | None = None, attention: str = "auto", memory=None):
    """An app serving `models` (loaded Pipelines or names; default genkit-mini), the first one current; `memory`: the
    GPU memory each is planned for (genkit.load)."""
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    from genkit.serve import a1111, errors, gallery, openai
    from genkit.serve.loras import LoraLibrary
    from genkit.serve.models import ModelPool
    from genkit.serve.queue import Coalescer
    from genkit.serve.security import Guard
    from genkit.serve.service import Service
    from genkit.serve.store import ImageStore

    limits = limits or Limits()
    limits = replace(limits, **{k: v for k, v in (("max_batch", max_batch), ("max_queue", max_queue)) if v})
    library = LoraLibrary(lora_dirs)
    pool = ModelPool(_load_all(models, device, dtype, attention, memory), lora_cache=lora_cache)
    store = ImageStore(out)
    queue = Coalescer(None, max_batch=limits.max_batch, max_queue=limits.max_queue, gather=gather)
    service = Service(pool, library, store, limits, queue)
    queue.run_batch, queue.deliver = service.run_batch, service.deliver

    @asynccontextmanager
    async def lifespan(app):
        queue.start()
        try:
            yield
        finally:
            queue.stop()
            store.close()

    app = FastAPI(title="genkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.genkit = Server(pool, library, store, limits, queue, service, api_key)
    errors.install(app)
    app.include_router(a1111.router)
    app.include_router(openai.router)
    app.include_router(gallery.router)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["*"], allow_headers=["*"])
    return app


def _load_all(models, device, dtype, attention, memory=None) -> list:
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
                                      attention=attention, memory=memory))
    return loaded
