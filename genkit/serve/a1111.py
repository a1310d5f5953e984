"""AUTOMATIC1111's API (`/sdapi/v1/*`), with A1111's field names and response shapes.

`txt2img` returns `{"images": [base64 PNG], "parameters": {...}, "info": "<JSON string>"}`;
info carries `seed`, `all_seeds`, `infotexts` and the rest A1111 writes. Unlike A1111, each
image carries its infotext (and genkit's record) in the PNG, no grid image is prepended
(`index_of_first_image` is 0), and image k of a batch can be remade alone from its seed.
LoRAs: `<lora:name:weight>` in the prompt, or `"loras": [{"name", "weight"}]`, from --lora-dir.

`img2img` takes one base64 `init_images` entry (a data: URL prefix allowed), an optional `mask`
(white repaints; `inpainting_mask_invert` 1 flips it) and `denoising_strength` (A1111's default
0.75), answering as txt2img. Without width/height the output has the input's size (rounded down
to the model's multiple). txt2img's hires fix (`enable_hr`, `hr_scale` or `hr_resize_x/y`, `hr_upscaler` "Latent"
or "Lanczos", `hr_second_pass_steps`, `denoising_strength`, A1111's 0.75 when absent) is genkit.hires'.
ControlNet: sd-webui-controlnet's units in `alwayson_scripts` and its /controlnet routes (genkit.serve.controlnet).
A1111 options genkit does not do (mask blur, "only masked", other
fills and resize modes, face restoration, tiling, variation seeds) are refused with
422 naming them when their value would change the image; absent, or genkit's own value, they pass
(so with a mask, mask_blur must be absent or 0: A1111 blurs by 4 when it is absent, genkit never).
"""

from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genkit import schedulers
from genkit.controlnet import infotext_fields
from genkit.errors import GenkitError
from genkit.outputs import infotext
from genkit.serve import controlnet
from genkit.serve.bodies import Body, LoraRef, read_model
from genkit.serve.errors import ApiError
from genkit.serve.service import Order

router = APIRouter(prefix="/sdapi/v1")

# A1111's words for the library's (genkit.settings), where they differ: errors name the client's field by it
FIELDS = {"num_images_per_prompt": "batch_size", "num_inference_steps": "steps", "guidance_scale": "cfg_scale",
          "scheduler": "sampler_name", "image": "init_images", "strength": "denoising_strength", "lora": "loras",
          "model": "override_settings.sd_model_checkpoint", "hires_scale": "hr_scale",
          "hires_strength": "denoising_strength", "hires_steps": "hr_second_pass_steps",
          "hires_upscaler": "hr_upscaler", "control": "alwayson_scripts.controlnet.args"}
HIRES_STRENGTH = 0.75  # A1111's API's denoising_strength for txt2img's hires fix (its UI's slider says 0.7)
HIRES_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}  # A1111's names (any case) -> genkit.hires'
SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
             "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")  # A1111's noise schedules; genkit has one


class Txt2Img(Body):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients' word for sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    override_settings: dict = {}
    loras: list[LoraRef] = []  # genkit's extension
    enable_hr: bool = False  # the hires fix (genkit.hires) with the hr_ fields and denoising_strength
    hr_scale: float = 2.0
    hr_resize_x: int = 0  # a target width instead of hr_scale (0: hr_scale)
    hr_resize_y: int = 0
    hr_upscaler: str | None = None  # "Latent" (the default) or "Lanczos"
    hr_second_pass_steps: int = 0  # 0: as many as steps
    denoising_strength: float | None = None  # the hires pass's (None: A1111's 0.75)
    alwayson_scripts: dict = {}  # sd-webui-controlnet's units under "controlnet" (genkit.serve.controlnet)
    restore_faces: bool = False
    tiling: bool = False
    subseed_strength: float = 0.0
    send_images: bool = True


class Img2Img(Txt2Img):
    init_images: list[str] = []
    mask: str | None = None  # white repaints (A1111's convention), or the opaque part of a transparent layer
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0  # 1: black repaints
    include_init_images: bool = False  # echo init_images and mask in `parameters`, as A1111
    # A1111's, refused when they would change the image (see UNSUPPORTED); absent means genkit's way
    resize_mode: int = 0
    mask_blur: float | None = None
    mask_blur_x: float | None = None
    mask_blur_y: float | None = None
    mask_round: bool = True
    inpainting_fill: int | None = None
    inpaint_full_res: bool | int | None = None
    inpaint_full_res_padding: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    image_cfg_scale: float | None = None  # instruct-pix2pix models only: no effect on the models genkit serves


# A1111 fields genkit does not do: (field, applies, the value genkit's way, why). A request whose value
# would change the image is refused with 422 naming every such field; defaults and genkit's own value
# pass. "mask" rows apply only with a mask (without one A1111 ignores them too).
UNSUPPORTED = (
    ("enable_hr", "edit", lambda v: not v, "the hires fix is txt2img's, not img2img's (send enable_hr false)"),
    ("restore_faces", "all", lambda v: not v, "face restoration is not offered (send restore_faces false)"),
    ("tiling", "all", lambda v: not v, "tiling is not offered (send tiling false)"),
    ("subseed_strength", "all", lambda v: v == 0, "variation seeds are not offered (send subseed_strength 0)"),
    ("resize_mode", "edit", lambda v: v == 0, "only resize_mode 0 (just resize: the whole input scaled to width x "
                                              "height) is offered"),
    ("initial_noise_multiplier", "edit", lambda v: v is None or v == 1, "only initial_noise_multiplier 1 is offered"),
    ("latent_mask", "edit", lambda v: v is None, "a separate latent_mask is not offered (send the mask only)"),
    ("inpainting_mask_invert", "edit", lambda v: v in (0, 1), "inpainting_mask_invert must be 0 or 1"),
    ("mask_blur", "mask", lambda v: v is None or v == 0, "genkit's masks are hard (binarised at 128, the kept region is "
                                                        "the input's pixels): send mask_blur 0"),
    ("mask_blur_x", "mask", lambda v: v is None or v == 0, "genkit's masks are hard: send mask_blur_x 0"),
    ("mask_blur_y", "mask", lambda v: v is None or v == 0, "genkit's masks are hard: send mask_blur_y 0"),
    ("mask_round", "mask", lambda v: v, "genkit's masks are binarised: send mask_round true"),
    ("inpainting_fill", "mask", lambda v: v is None or v == 1, "the masked region starts from the input image "
                                                              "(A1111's 'original', 1); 0, 2 and 3 are not offered"),
    ("inpaint_full_res", "mask", lambda v: not v, "inpainting at full resolution ('only masked') is not offered: "
                                                 "send inpaint_full_res false (the whole picture)"),
)


def server(request: Request):
    return request.app.state.genkit


@router.post("/txt2img")
async def txt2img(request: Request):
    body = await read_model(request, Txt2Img)
    return await _generate(request, body, _order(request, body))


@router.post("/img2img")
async def img2img(request: Request):
    body = await read_model(request, Img2Img)
    return await _generate(request, body, img2img_order(request, body))


def img2img_order(request: Request, body: Img2Img) -> Order:
    """An img2img body's order: its settings, the decoded input image and mask, the strength (genkit.serve.jobs
    too)."""
    from genkit.serve import inputs

    order = _order(request, body, edit="mask" if body.mask else "edit")
    if len(body.init_images) != 1:
        raise ApiError(422, f"init_images: genkit serves one input image per request, got {len(body.init_images)} "
                            "(use batch_size for several images of one input)", param="init_images")
    max_side = server(request).limits.max_input_side
    order.image = inputs.decode_base64(body.init_images[0], "init_images.0", max_side)
    if body.mask:
        order.mask = inputs.a1111_mask(inputs.decode_base64(body.mask, "mask", max_side),
                                       invert=body.inpainting_mask_invert == 1)
        inputs.check_mask(order.mask, order.image, "mask", 422)
    order.strength = body.denoising_strength
    return order


def _order(request: Request, body: Txt2Img, edit: str | None = None) -> Order:
    _refuse_unsupported(body, edit)
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise ApiError(422, f"{name} must be at least 1, got {getattr(body, name)}", param=name)
    limit = server(request).limits.max_images
    if body.batch_size * body.n_iter > limit:
        raise ApiError(422, f"batch_size * n_iter asks for {body.batch_size * body.n_iter} images; this server makes "
                            f"at most {limit} per request (--max-images)", param="batch_size", code="limit")
    if body.seed < -1:
        raise ApiError(422, f"seed must be -1 (random) or from 0 up, got {body.seed}", param="seed")
    model = body.override_settings.get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise ApiError(422, "override_settings.sd_model_checkpoint must be a string",
                       param="override_settings.sd_model_checkpoint")
    return Order(prompt=body.prompt, negative_prompt=body.negative_prompt,
                 num_images_per_prompt=body.batch_size * body.n_iter, seed=None if body.seed == -1 else body.seed,
                 num_inference_steps=body.steps, guidance_scale=body.cfg_scale, width=body.width, height=body.height,
                 scheduler=_sampler(body), model=model, lora=[(ref.name, ref.value) for ref in body.loras],
                 fields=FIELDS, **_hires(body, edit, server(request).limits.max_side),
                 control=controlnet.units(request, body.alwayson_scripts, body.width, body.height,
                                          server(request).limits.max_input_side))


def _hires(body: Txt2Img, edit: str | None, max_side: int) -> dict:
    """txt2img's enable_hr as the library's hires settings (genkit.hires checks their values); {} without it. The
    output, scale times width and height, is bounded like them (--max-size)."""
    if edit is not None or not body.enable_hr:
        return {}
    upscaler = (body.hr_upscaler or "Latent").strip()
    if upscaler.lower() not in HIRES_UPSCALERS:
        raise ApiError(422, f"hr_upscaler: {upscaler!r} is not offered (valid: Latent, Lanczos; genkit serve loads no "
                            "upscaling models)", param="hr_upscaler")
    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        scale = _resize_scale(body)
    for side in (body.width, body.height):
        if side is not None and isinstance(scale, (int, float)) and side * scale > max_side:
            raise ApiError(422, f"hr_scale {scale:g} makes the image {side * scale:g} pixels on a side; this server makes "
                                f"images at most {max_side} pixels wide and high (--max-size)", param="hr_scale",
                           code="limit")
    return {"hires_scale": scale, "hires_steps": body.hr_second_pass_steps,
            "hires_strength": HIRES_STRENGTH if body.denoising_strength is None else body.denoising_strength,
            "hires_upscaler": HIRES_UPSCALERS[upscaler.lower()]}


def _resize_scale(body: Txt2Img) -> float:
    """hr_resize_x/y as one scale: genkit scales both sides by one factor (sides rounded to the model's multiple)."""
    scales = {}
    for name, target, side in (("hr_resize_x", body.hr_resize_x, body.width), ("hr_resize_y", body.hr_resize_y,
                                                                                 body.height)):
        if target:
            if side is None:
                raise ApiError(422, f"{name} needs {'width' if name.endswith('x') else 'height'} too (the hires size is "
                                    "a scale of it), or send hr_scale", param=name)
            scales[name] = target / side
    if len(set(round(s, 3) for s in scales.values())) > 1:
        raise ApiError(422, f"hr_resize_x and hr_resize_y scale width and height by {scales['hr_resize_x']:.3g} and "
                            f"{scales['hr_resize_y']:.3g}; genkit scales both by one factor (send one of them, or "
                            "hr_scale)", param="hr_resize_x")
    return next(iter(scales.values()))


def _sampler(body: Txt2Img) -> str | None:
    """genkit's sampler for A1111's sampler_name (+ scheduler; 'DPM++ 2M Karras' is both in one)."""
    name = (body.sampler_name or body.sampler_index or "").strip()
    schedule = (body.scheduler or "").strip()
    for suffix in SCHEDULES[1:]:
        if name.lower().endswith(" " + suffix.lower()):
            name, schedule = name[: -len(suffix) - 1], suffix
    if schedule and schedule.lower() not in ("automatic", "default"):
        raise ApiError(422, f"scheduler {schedule!r} is not offered (valid: Automatic; genkit samples with trailing "
                            "timestep spacing)", param="scheduler")
    if not name or name.lower() in ("default", "automatic"):
        return "default" if name.lower() == "default" else None
    try:
        return schedulers.parse(name).value
    except (GenkitError, ValueError):
        valid = ", ".join(entry["name"] for entry in _samplers())
        raise ApiError(422, f"sampler_name: unknown sampler {name!r} (valid: {valid})", param="sampler_name") from None


def _refuse_unsupported(body: Txt2Img, edit: str | None) -> None:
    """422 naming every field whose value asks for something genkit does not do (`edit`: None for txt2img,
    "edit" for img2img, "mask" for img2img with a mask)."""
    applies = {None: ("all",), "edit": ("all", "edit"), "mask": ("all", "edit", "mask")}[edit]
    found = [(name, why) for name, scope, fine, why in UNSUPPORTED
             if scope in applies and hasattr(body, name) and not fine(getattr(body, name))]
    if found:
        detail = "; ".join(f"{name} {json.dumps(getattr(body, name))}: {why}" for name, why in found)
        raise ApiError(422, f"not offered by genkit serve: {detail}" if len(found) > 1 else
                       f"{found[0][0]}: {found[0][1]} (got {json.dumps(getattr(body, found[0][0]))})",
                       param=found[0][0], code="unsupported")


async def _generate(request: Request, body: Txt2Img, order: Order):
    state = server(request)
    delivery = await state.service.run(order, request)
    if delivery is None:  # the client went away
        return Response(status_code=499)
    records = [entry.record for entry in delivery.entries]
    images = [base64.b64encode(state.store.path(e.file).read_bytes()).decode() for e in delivery.entries] \
        if body.send_images else []
    parameters = body.model_dump()
    if isinstance(body, Img2Img) and not body.include_init_images:  # as A1111: the inputs are not echoed
        parameters.update(init_images=None, mask=None)
    return {"images": images, "parameters": parameters, "info": json.dumps(_info(body, records, delivery))}


def _info(body: Txt2Img, records: list, delivery) -> dict:
    first = records[0] if records else {}
    seeds = [r["seed"] for r in records]
    sampler = first.get("scheduler", body.sampler_name)
    try:
        sampler = schedulers.a1111_name(sampler) if sampler else sampler
    except GenkitError:
        pass
    return {
        "prompt": body.prompt, "all_prompts": [r["prompt"] for r in records],
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [r["negative_prompt"] for r in records],
        "seed": seeds[0] if seeds else body.seed, "all_seeds": seeds, "subseed": seeds[0] if seeds else -1,
        "all_subseeds": seeds, "subseed_strength": 0, "width": first.get("width", body.width),
        "height": first.get("height", body.height), "sampler_name": sampler,
        "cfg_scale": first.get("guidance_scale", body.cfg_scale), "steps": first.get("num_inference_steps", body.steps),
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": delivery.model, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.get("strength", first.get("hires_strength")),
        "extra_generation_params": {**({"Lora": ", ".join(f"{lo['name']}: {lo['scale']}" for lo in first["lora"])}
                                       if first.get("lora") else {}), **infotext_fields(first)},
        "index_of_first_image": 0, "infotexts": [infotext(r) for r in records], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": f"genkit {first.get('versions', {}).get('genkit', '')}".strip(),
        "interrupted": delivery.interrupted, "files": [e.file for e in delivery.entries],
    }


def _samplers() -> list[dict]:
    entries = []
    for name in schedulers.NAMES:
        try:
            entries.append({"name": schedulers.a1111_name(name), "aliases": [name], "options": {}})
        except GenkitError:
            entries.append({"name": name, "aliases": [], "options": {}})
    return entries


@router.get("/samplers")
def samplers():
    return _samplers()


@router.get("/schedulers")
def schedules():
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False}]


@router.get("/sd-models")
def sd_models(request: Request):
    from pathlib import Path

    return [{"title": name, "model_name": Path(name).name, "hash": None, "sha256": None, "filename": name,
             "config": None} for name in server(request).pool.names()]


@router.get("/options")
def get_options(request: Request):
    return {"sd_model_checkpoint": server(request).pool.current, "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}


@router.post("/options")
async def set_options(request: Request):
    from genkit.serve.bodies import read_json

    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object of options", param="body")
    if "sd_model_checkpoint" in body:
        value = body["sd_model_checkpoint"]
        if not isinstance(value, str):
            raise ApiError(422, "sd_model_checkpoint must be a string", param="sd_model_checkpoint")
        pool = server(request).pool
        pool.current = pool.resolve(value, "sd_model_checkpoint")
    return None  # other options are accepted and ignored, as A1111 stores what it does not use


@router.get("/loras")
def loras(request: Request):
    return server(request).library.a1111_list()


@router.post("/refresh-loras")
def refresh_loras(request: Request):
    server(request).library.refresh()
    return None


@router.get("/sd-vae")
def sd_vae():
    return []


@router.get("/upscalers")
def upscalers():
    return [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/latent-upscale-modes")
def latent_upscale_modes():
    return [{"name": "Latent"}]


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False):
    status = server(request).queue.status()
    fraction = status["step"] / status["steps"] if status["running"] and status["steps"] else 0.0
    elapsed = time.monotonic() - status["started"] if status["running"] else 0.0
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "current_image": None, "textinfo": None,
            "current_task": None,
            "state": {"skipped": False, "interrupted": status["interrupted"], "stopping_generation": False,
                      "job": ("img2img" if status["task"] else "txt2img") if status["running"] else "",
                      "job_count": status["requests"],
                      "job_timestamp": "0", "job_no": 0, "sampling_step": status["step"],
                      "sampling_steps": status["steps"], "images_waiting": status["waiting"]}}


@router.post("/interrupt")
def interrupt(request: Request):
    server(request).queue.interrupt()
    return {}


@router.post("/skip")
def skip(request: Request):
    server(request).queue.interrupt()
    return {}
