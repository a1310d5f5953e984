"""The gallery page (`GET /`) and the JSON it reads (`/genkit/v1/*`).

- `GET /genkit/v1/images?q=&limit=`: recent images, newest first, each with its record;
- `GET /genkit/v1/images/{file}`: one image's entry; `GET /genkit/v1/files/{file}`: the PNG;
- `POST /genkit/v1/images/{file}/variation`: the same settings (model, LoRAs, an edit's kept input) with a new
  seed;
- `GET /genkit/v1/status`: models, the queue, batch counts.

The page is one static file (gallery.html, no build step, nothing from a CDN).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from genkit import settings
from genkit.serve.errors import ApiError
from genkit.serve.service import Order

router = APIRouter()
# the gallery's words (its JSON, the page's) for the library's (genkit.settings), where they differ
FIELDS = {"num_images_per_prompt": "n", "num_inference_steps": "steps", "guidance_scale": "guidance", "lora": "loras"}
SHOWN = (*settings.names(recorded=True, edit=False), "model")  # what an entry says of its record, in FIELDS' words


def _page() -> str:
    return resources.files("genkit.serve").joinpath("gallery.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
def page():
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@router.get("/genkit/v1/images")
def images(request: Request, q: str = Query("", max_length=500), limit: int = Query(100, ge=1, le=1000)):
    state = request.app.state.genkit
    return {"images": [_entry(e) for e in state.store.newest(limit, q)], "models": state.pool.names(),
            "loras": state.library.names(), "auth": bool(state.api_key)}


@router.get("/genkit/v1/status")
def status(request: Request):
    """Models, the queue now, and batch counts since start (shared_batches: batches that held several requests)."""
    state = request.app.state.genkit
    return {"models": state.pool.names(), "current": state.pool.current, "queue": state.queue.status(),
            "max_batch": state.limits.max_batch, "max_queue": state.limits.max_queue}


@router.get("/genkit/v1/images/{name}")
def image(request: Request, name: str):
    return _entry(_find(request, name))


@router.get("/genkit/v1/files/{name}")
def file(request: Request, name: str):
    path = request.app.state.genkit.store.path(name)
    if path is None:
        raise ApiError(404, f"no image {name!r} here", param="name")
    return FileResponse(path, media_type="image/png")


@router.post("/genkit/v1/images/{name}/variation")
async def variation(request: Request, name: str):
    state = request.app.state.genkit
    record = _find(request, name).record
    loras = []
    for lora in record.get("lora", []):
        served = state.library.name_of(lora.get("path", ""))
        if served is None:
            raise ApiError(422, f"LoRA {lora.get('name')!r} of this image is not served now", param=FIELDS["lora"])
        loras.append((served, float(lora["scale"])))
    # the record's settings but its seed (the engine draws a new one); an edit's input kept beside the images (--out)
    same = {name: record[name] for name in settings.names(per_prompt=True, recorded=True, edit=False)
            if name != "seed" and name in record}
    order = Order(**same, model=record["model"], lora=loras, fields=FIELDS)
    if record.get("image") is not None:
        for name in settings.names(edit=True):
            setattr(order, name, _kept(state, record, name) if settings.BY_NAME[name].digest else record.get(name))
    delivery = await state.service.run(order, request)
    if delivery is None:
        return Response(status_code=499)
    return {"images": [_entry(e) for e in delivery.entries], "interrupted": delivery.interrupted}


def _kept(state, record: dict, key: str):
    from genkit.data import decode

    if record.get(key) is None:
        return None
    path = state.store.input_path(record[key])
    if path is None:
        raise ApiError(422, f"this image was edited from an input {key} the server did not keep (it keeps them only "
                            "with --out)", param=key)
    return decode.open_image(path)  # a PNG this server wrote: the pixels it was given


def _find(request: Request, name: str):
    entry = request.app.state.genkit.store.find(name)
    if entry is None:
        raise ApiError(404, f"no image {name!r} here", param="name")
    return entry


def _entry(entry) -> dict:
    from genkit.outputs import infotext

    record = entry.record
    return {"file": entry.file, "url": f"/genkit/v1/files/{entry.file}", "time": entry.time,
            **{FIELDS.get(name, name): record.get(name) for name in SHOWN},
            FIELDS["lora"]: [{"name": lo.get("name"), "scale": lo.get("scale")} for lo in record.get("lora", [])],
            "infotext": infotext(record), "record": record}
