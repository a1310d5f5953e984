"""OpenAI's images API (`/v1/images/generations`, `/v1/models`), as its clients expect it.

`{"model", "prompt", "n", "size": "WxH", "response_format": "b64_json" | "url"}` returns
`{"created", "data": [{"b64_json"} or {"url"}]}`; errors are `{"error": {"message", "type", "param",
"code"}}`. genkit's extensions: `seed` (image i gets seed + i), `steps`, `guidance`,
`negative_prompt`, `scheduler`, `loras: [{"name", "scale"}]`. A `url` points at this server's
copy of the image (send the API key to fetch it when one is set). `b64_json` is the default.
"""

from __future__ import annotations

import base64
import re
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genkit.serve.bodies import Body, LoraRef, read_model
from genkit.serve.errors import ApiError
from genkit.serve.service import Order

router = APIRouter(prefix="/v1")
FIELDS = {"width": "size", "height": "size", "scheduler": "scheduler"}


class Generations(Body):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None  # "WxH" or "auto"
    response_format: str | None = None
    quality: str | None = None  # accepted and ignored, like style and user
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str = ""
    scheduler: str | None = None
    loras: list[LoraRef] = []


@router.post("/images/generations")
async def generations(request: Request):
    body = await read_model(request, Generations, status=400)
    fmt = body.response_format or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise ApiError(400, f"response_format must be 'b64_json' or 'url', got {fmt!r}", param="response_format")
    if body.seed is not None and body.seed < 0:
        raise ApiError(400, f"seed must be 0 or more, got {body.seed}", param="seed")
    width, height = _size(body.size)
    order = Order(prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, seed=body.seed,
                  steps=body.steps, guidance=body.guidance, width=width, height=height, scheduler=body.scheduler,
                  model=body.model, loras=[(ref.name, ref.value) for ref in body.loras], fields=FIELDS)
    state = request.app.state.genkit
    if body.model:
        state.pool.resolve(body.model, "model", status=404)
    delivery = await state.service.run(order, request)
    if delivery is None:
        return Response(status_code=499)
    if delivery.interrupted and not delivery.entries:
        raise ApiError(409, "the generation was interrupted before any image was finished", code="interrupted")
    data = []
    for entry in delivery.entries:
        item = {"revised_prompt": entry.record["prompt"], "seed": entry.record["seed"]}
        if fmt == "url":
            item["url"] = f"{str(request.base_url).rstrip('/')}/genkit/v1/files/{entry.file}"
        else:
            item["b64_json"] = base64.b64encode(state.store.path(entry.file).read_bytes()).decode()
        data.append(item)
    return {"created": int(time.time()), "data": data}


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
    if not match:
        raise ApiError(400, f"size must look like '512x512' (width x height) or 'auto', got {size!r}", param="size")
    return int(match.group(1)), int(match.group(2))


@router.post("/images/edits")
async def edits(request: Request):
    form = await request.form()
    for name in ("image", "prompt"):
        if name not in form and f"{name}[]" not in form:
            raise ApiError(400, f"{name} is required (multipart form field)", param=name)
    raise ApiError(501, "image edits are not in genkit's engine yet; only /v1/images/generations is served",
                   code="not_implemented")


@router.post("/images/variations")
async def variations(request: Request):
    raise ApiError(501, "image variations are not offered; only /v1/images/generations is served",
                   code="not_implemented")


@router.get("/models")
def models(request: Request):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "genkit"}
                                       for name in request.app.state.genkit.pool.names()]}
