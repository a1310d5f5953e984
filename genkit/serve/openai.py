"""OpenAI's images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`), as its clients expect it.

`{"model", "prompt", "n", "size": "WxH", "response_format": "b64_json" | "url"}` returns
`{"created", "data": [{"b64_json"} or {"url"}]}`; errors are `{"error": {"message", "type", "param",
"code"}}`. genkit's extensions: `seed` (image i gets seed + i), `steps`, `guidance`,
`negative_prompt`, `scheduler`, `loras: [{"name", "scale"}]`. A `url` points at this server's
copy of the image (send the API key to fetch it when one is set). `b64_json` is the default.

`images/edits` is multipart: `image` (a PNG; JPEG and WebP also read), an optional `mask` (a PNG
whose transparent pixels mark the region to edit, of the image's size), `prompt`, `n`, `size`,
`response_format` and the same extensions as form fields, plus `strength` (0-1]; default 0.8,
or 1.0 with a mask). Without a mask, the image's own transparent pixels are the region to edit,
as OpenAI does for DALL-E 2; an image without any is edited whole (img2img, `strength` says how far).
On a model that edits by instruction (Qwen-Image-Edit, Flux.2 [klein]: genkit.families' "instruct"), a request
without a mask or `strength` is an instruction edit, as OpenAI's edits are for its GPT image models: the prompt says
what to change, the image's transparency is no mask, and several `image[]` files are read together where the model
takes several.
"""

from __future__ import annotations

import base64
import re
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genkit.serve.bodies import Body, LoraRef, parse, read_model
from genkit.serve.errors import ApiError
from genkit.serve.service import Order

router = APIRouter(prefix="/v1")
# OpenAI's words (and genkit's extensions') for the library's (genkit.settings), where they differ: errors name the
# client's field by it
FIELDS = {"num_images_per_prompt": "n", "num_inference_steps": "steps", "guidance_scale": "guidance", "width": "size",
          "height": "size", "lora": "loras"}


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


class Edits(Generations):
    strength: float | None = None  # genkit's extension: how far the edit may move from the input


@router.post("/images/generations")
async def generations(request: Request):
    body = await read_model(request, Generations, status=400)
    return await _answer(request, body, _order(body))


def _order(body: Generations) -> Order:
    if (body.response_format or "b64_json") not in ("b64_json", "url"):
        raise ApiError(400, f"response_format must be 'b64_json' or 'url', got {body.response_format!r}",
                       param="response_format")
    if body.seed is not None and body.seed < 0:
        raise ApiError(400, f"seed must be 0 or more, got {body.seed}", param="seed")
    width, height = _size(body.size)
    return Order(prompt=body.prompt, negative_prompt=body.negative_prompt, num_images_per_prompt=body.n,
                 seed=body.seed, num_inference_steps=body.steps, guidance_scale=body.guidance, width=width,
                 height=height, scheduler=body.scheduler, model=body.model,
                 lora=[(ref.name, ref.value) for ref in body.loras], fields=FIELDS)


async def _answer(request: Request, body: Generations, order: Order):
    fmt = body.response_format or "b64_json"
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
    from genkit.serve import inputs

    async with request.form() as form:  # uploaded files are closed when the form is read
        files = [*form.getlist("image"), *form.getlist("image[]")]
        if not files:
            raise ApiError(400, "image is required (a multipart file field holding a PNG)", param="image")
        body = parse(Edits, _typed(form, Edits), status=400)
        instruct = form.get("mask") is None and body.strength is None and _edits_by_instruction(request, body.model)
        if len(files) > 1 and not instruct:
            raise ApiError(400, f"image: {len(files)} images; genkit reads several only as an instruction edit's, on a "
                                "model that edits by instruction, without a mask or strength", param="image")
        images = [await _file_bytes(part, "image") for part in files]
        mask = await _file_bytes(form.get("mask"), "mask") if form.get("mask") is not None else None
    order = _order(body)
    max_side = request.app.state.genkit.limits.max_input_side
    read = [inputs.decode_bytes(image, "image", max_side) for image in images]
    order.image = read[0] if len(read) == 1 else read
    if instruct:  # the prompt says what to change; the image's transparency is not a mask
        return await _answer(request, body, order)
    if mask is not None:
        order.mask = inputs.openai_mask(inputs.decode_bytes(mask, "mask", max_side), "mask")
        inputs.check_mask(order.mask, order.image, "mask", 400, convention="transparent")
    elif inputs.is_transparent_somewhere(order.image):  # OpenAI: without a mask, the image's transparency is one
        order.mask = inputs.openai_mask(order.image, "image")
        inputs.check_mask(order.mask, order.image, "image", 400, convention="transparent")
    order.strength = body.strength
    if mask is None:  # the mask is the image's own transparency: its errors are about the image
        order.fields = {**order.fields, "mask": "image"}
    return await _answer(request, body, order)


def _edits_by_instruction(request: Request, model: str | None) -> bool:
    """The model edits an input image by instruction (its family's "instruct" task)."""
    pool = request.app.state.genkit.pool
    return "instruct" in pool.get(pool.resolve(model, "model", status=404)).family.edit_tasks


async def _file_bytes(part, field: str) -> bytes:
    if isinstance(part, str):
        raise ApiError(400, f"{field} must be a file (multipart with a filename), not a text field", param=field)
    return await part.read()


def _typed(form, model) -> dict:
    """A multipart form's text fields as the JSON body `model` reads: numbers parsed, `loras` as JSON."""
    import json

    out = {}
    for name, info in model.model_fields.items():
        value = form.get(name)
        if value is None or name in ("image", "mask"):
            continue
        if not isinstance(value, str):
            raise ApiError(400, f"{name} must be a text field, not a file", param=name)
        kind = str(info.annotation)
        try:
            if name == "loras":
                out[name] = json.loads(value)
            elif "int" in kind:
                out[name] = int(value)
            elif "float" in kind:
                out[name] = float(value)
            else:
                out[name] = value
        except ValueError:
            what = "a JSON list" if name == "loras" else "an integer" if "int" in kind else "a number"
            raise ApiError(400, f"{name} must be {what}, got {value[:60]!r}", param=name) from None
    return out


@router.post("/images/variations")
async def variations(request: Request):
    raise ApiError(501, "image variations are not offered; only /v1/images/generations is served",
                   code="not_implemented")


@router.get("/models")
def models(request: Request):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "genkit"}
                                       for name in request.app.state.genkit.pool.names()]}
