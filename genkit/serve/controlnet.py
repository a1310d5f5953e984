"""sd-webui-controlnet's API in genkit serve's A1111 dialect: ControlNet units in a txt2img body, and the extension's
list routes.

A txt2img body steers with ControlNets as the extension reads them:

    "alwayson_scripts": {"controlnet": {"args": [{"image": "<base64>", "module": "canny",
                                                  "model": "control_canny [1a2b3c4d]", "weight": 1.0,
                                                  "guidance_start": 0.0, "guidance_end": 1.0}]}}

Each enabled unit becomes a genkit.controlnet.Control: `model` is a name from the folders given with
`--controlnet-dir` (a subfolder holding a diffusers ControlNet, or a `.safetensors` file; with or without the
" [hash]" that /controlnet/model_list shows), never a path from the request; `module` is a built-in preprocessor
(none, canny); `image` is base64 (a data: URL prefix allowed), or {"image": ...}. The extension's other unit fields
pass when absent or at genkit's own behaviour, and are refused with 422 naming them when they would change the
image: resize_mode (only "Crop and Resize", its default), control_mode (only "Balanced"), a unit's mask,
processor_res (genkit runs canny at the output size, as pixel_perfect: -1, pixel_perfect true or the output's
shorter side pass), threshold_a/threshold_b (canny's 100 and 200; -1 passes). `enabled: false` units are skipped;
low_vram is accepted and changes nothing. Unknown modules and models are 422 naming the field
(`alwayson_scripts.controlnet.args.N.model`); other always-on scripts are refused by name.

Routes (the extension's response shapes): `GET /controlnet/model_list` -> {"model_list": ["name [hash]", ...]} (the
hash is A1111's short model hash: sha256 of 64 KiB at 1 MiB into the weights, 8 hex digits),
`GET /controlnet/module_list` -> {"module_list": [...], "module_detail": {module: {"model_free", "sliders"}}},
`GET /controlnet/version` -> {"version": 2}, `GET /controlnet/settings` -> {"control_net_unit_count": N}.

`install(app, folders)` adds the routes and the folders' ControlNets to an app made by create_app
(`genkit serve --controlnet-dir` calls it).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from fastapi import APIRouter, Request

from genkit import controlnet
from genkit.errors import GenkitError
from genkit.serve.bodies import Body
from genkit.serve.errors import ApiError

router = APIRouter(prefix="/controlnet")
FIELD = "alwayson_scripts.controlnet.args"
MAX_UNITS = 4  # units one request may enable
# the extension's default resize mode, by its names, its old aliases and its number
RESIZE_MODES = ("crop and resize", "inner fit (scale to fit)", "scale to fit (inner fit)", 1)
CONTROL_MODES = ("balanced", 0)
# the extension's module_detail for the built-in preprocessors (scripts/processor.py's slider configs)
MODULE_DETAIL = {
    "none": {"model_free": False, "sliders": []},
    "canny": {"model_free": False, "sliders": [
        {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048},
        {"name": "Canny Low Threshold", "value": controlnet.CANNY_THRESHOLDS[0], "min": 1, "max": 255},
        {"name": "Canny High Threshold", "value": controlnet.CANNY_THRESHOLDS[1], "min": 1, "max": 255}]},
}
_HASHED = re.compile(r"^(.*\S)\s+\[[0-9a-fA-F]{8,}\]$")  # "name [1a2b3c4d]"


class Unit(Body):
    """One of the extension's ControlNet units (its API's field names and defaults)."""

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: str | dict | None = None
    input_image: str | None = None  # older clients' word for image
    mask: str | None = None
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guidance: float | None = None  # older clients' word for guidance_end
    resize_mode: int | str = "Crop and Resize"
    processor_res: int | float | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    control_mode: int | str = "Balanced"
    low_vram: bool = False
    guessmode: bool = False


class ControlNetLibrary:
    """The ControlNets a server offers, by name, from the folders given at startup (--controlnet-dir)."""

    def __init__(self, folders=()):
        self.folders = [Path(folder) for folder in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise GenkitError(f"--controlnet-dir {folder}: not a folder (pass a folder of ControlNets)")
        self.paths: dict[str, Path] = {}
        self._hashes: dict[tuple, str] = {}
        self.refresh()

    def refresh(self) -> None:
        """Scan the folders: each subfolder with a config.json and .safetensors weights is a ControlNet named by the
        subfolder, each .safetensors file one named by its stem (the first folder wins a name)."""
        paths: dict[str, Path] = {}
        for folder in self.folders:
            for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
                if entry.is_file() and entry.suffix == ".safetensors":
                    paths.setdefault(entry.stem, entry.absolute())  # not resolved: its name is the record's too
                elif entry.is_dir() and (entry / "config.json").is_file() and any(entry.glob("*.safetensors")):
                    paths.setdefault(entry.name, entry.absolute())
        self.paths = paths

    def short_hash(self, path: Path) -> str:
        """A1111's short model hash of the (first) weights file: sha256 of 64 KiB from 1 MiB in, 8 hex digits."""
        file = controlnet.weights_files(path)[0]
        stat = file.stat()
        key = (str(file), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            with open(file, "rb") as f:
                f.seek(0x100000)
                self._hashes[key] = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        return self._hashes[key]

    def a1111_names(self) -> list[str]:
        return [f"{name} [{self.short_hash(path)}]" for name, path in sorted(self.paths.items())]

    def resolve(self, name: str, field: str) -> Path:
        bare = _HASHED.match(name.strip())
        bare = bare.group(1) if bare else name.strip()
        if bare not in self.paths:
            offered = ", ".join(self.a1111_names()) or "none; start the server with --controlnet-dir FOLDER"
            raise ApiError(422, f"{field}: unknown ControlNet {name!r} (offered: {offered}; GET "
                                "/controlnet/model_list)", param=field)
        return self.paths[bare]


def install(app, folders=()) -> ControlNetLibrary:
    """Add the ControlNet routes and the ControlNets in `folders` to an app made by genkit.serve.create_app."""
    library = ControlNetLibrary(folders)
    app.state.controlnets = library
    if not any(getattr(route, "path", "").startswith(router.prefix) for route in app.routes):
        app.include_router(router)
    return library


def library_of(request: Request) -> ControlNetLibrary | None:
    return getattr(request.app.state, "controlnets", None)


@router.get("/model_list")
def model_list(request: Request, update: bool = True):
    library = library_of(request)
    if library is not None and update:
        library.refresh()
    return {"model_list": library.a1111_names() if library is not None else []}


@router.get("/module_list")
def module_list(alias_names: bool = False):
    return {"module_list": list(MODULE_DETAIL), "module_detail": MODULE_DETAIL}


@router.get("/version")
def version():
    return {"version": 2}


@router.get("/settings")
def settings():
    return {"control_net_unit_count": MAX_UNITS}


# --- a body's units -------------------------------------------------------------------------------------------------


def units(request: Request, scripts: dict, width: int | None, height: int | None, max_side: int) -> tuple | None:
    """The Controls of a body's `alwayson_scripts` (None without an enabled ControlNet unit); 422 naming the field of
    anything genkit does not do."""
    if not scripts:
        return None
    if not isinstance(scripts, dict):
        raise ApiError(422, "alwayson_scripts must be an object of scripts", param="alwayson_scripts")
    found = None
    for name, script in scripts.items():
        if name.lower() != "controlnet":
            raise ApiError(422, f"alwayson_scripts.{name}: genkit serve runs no {name!r} script (only ControlNet)",
                           param=f"alwayson_scripts.{name}")
        found = script
    args = found.get("args", []) if isinstance(found, dict) else found
    if not isinstance(args, list):
        raise ApiError(422, f"{FIELD}: must be a list of ControlNet units", param=FIELD)
    from genkit.serve.bodies import parse

    parsed = []
    for k, arg in enumerate(args):
        if arg is not None and not isinstance(arg, dict):
            raise ApiError(422, f"{FIELD}.{k}: must be an object (a ControlNet unit)", param=f"{FIELD}.{k}")
        try:
            parsed.append(None if arg is None else parse(Unit, arg))
        except ApiError as exc:  # named within the unit: its field's full path
            raise ApiError(422, f"{FIELD}.{k}.{exc.message}", param=f"{FIELD}.{k}.{exc.param}") from None
    enabled = [(k, unit) for k, unit in enumerate(parsed) if unit is not None and unit.enabled]
    if not enabled:
        return None
    if len(enabled) > MAX_UNITS:
        raise ApiError(422, f"{FIELD}: {len(enabled)} enabled units; this server takes at most {MAX_UNITS}",
                       param=FIELD, code="limit")
    library = library_of(request)
    if library is None:
        raise ApiError(422, f"{FIELD}: this server offers no ControlNets (start genkit serve with --controlnet-dir "
                            "FOLDER)", param=FIELD)
    return tuple(_control(k, unit, library, width, height, max_side) for k, unit in enabled)


def _control(k: int, unit: Unit, library: ControlNetLibrary, width, height, max_side: int) -> controlnet.Control:
    from genkit.serve import inputs

    where = f"{FIELD}.{k}"
    module = unit.module.strip().lower()
    if module not in controlnet.PREPROCESSORS:
        raise ApiError(422, f"{where}.module: {unit.module!r} is not offered (offered: {', '.join(MODULE_DETAIL)}; run "
                            "other detectors yourself and send their map with module none)", param=f"{where}.module")
    if unit.model.strip().lower() in ("", "none"):
        raise ApiError(422, f"{where}.model: an enabled unit needs a model (GET /controlnet/model_list)",
                       param=f"{where}.model")
    _refuse_unsupported(where, unit, module, width, height)
    end = unit.guidance if unit.guidance is not None and "guidance_end" not in unit.model_fields_set else \
        unit.guidance_end
    _check_numbers(where, unit.weight, unit.guidance_start, end)
    image = unit.image if unit.image is not None else unit.input_image
    if isinstance(image, dict):
        if image.get("mask"):
            raise ApiError(422, f"{where}.image.mask: a unit's mask is not offered (send the image alone)",
                           param=f"{where}.image.mask")
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise ApiError(422, f"{where}.image: a txt2img unit needs its control image (base64)", param=f"{where}.image")
    picture = inputs.decode_base64(image, f"{where}.image", max_side)
    if module == "canny":
        try:
            controlnet.require_opencv()
        except GenkitError as exc:
            raise ApiError(422, f"{where}.module: {exc.message}", param=f"{where}.module") from None
    return controlnet.Control(str(library.resolve(unit.model, f"{where}.model")), picture, module, float(unit.weight),
                              float(unit.guidance_start), float(end))


def _check_numbers(where: str, weight, start, end) -> None:
    checks = (("weight", weight, 0, controlnet.MAX_WEIGHT), ("guidance_start", start, 0, 1),
              ("guidance_end", end, 0, 1))
    for name, value, low, high in checks:
        if not math.isfinite(value) or not low <= value <= high:
            raise ApiError(422, f"{where}.{name}: must be from {low:g} to {high:g}, got {value:g}",
                           param=f"{where}.{name}")
    if start >= end:
        raise ApiError(422, f"{where}.guidance_start: {start:g} is not below guidance_end {end:g} (the unit would act "
                            "in no step)", param=f"{where}.guidance_start")


def _refuse_unsupported(where: str, unit: Unit, module: str, width, height) -> None:
    """422 naming a field whose value asks for what genkit does not do."""
    def refuse(name, why):
        raise ApiError(422, f"{where}.{name}: {why} (got {getattr(unit, name)!r})", param=f"{where}.{name}",
                       code="unsupported")

    mode = unit.resize_mode.strip().lower() if isinstance(unit.resize_mode, str) else unit.resize_mode
    if mode not in RESIZE_MODES:
        refuse("resize_mode", "only \"Crop and Resize\" (1, the extension's default) is offered")
    control = unit.control_mode.strip().lower() if isinstance(unit.control_mode, str) else unit.control_mode
    if control not in CONTROL_MODES:
        refuse("control_mode", "only \"Balanced\" (0) is offered")
    if unit.guessmode:
        refuse("guessmode", "guess mode is not offered (send false)")
    if unit.mask:
        refuse("mask", "a unit's mask is not offered (send the image alone)")
    if module != "canny":
        return
    shorter = min(width, height) if width and height else None
    if unit.processor_res not in (None, -1) and not unit.pixel_perfect and unit.processor_res != shorter:
        refuse("processor_res", "genkit runs canny at the output size (the extension's pixel_perfect): send "
                                f"pixel_perfect true, processor_res -1{f' or {shorter}' if shorter else ''}")
    for name, default in (("threshold_a", controlnet.CANNY_THRESHOLDS[0]),
                          ("threshold_b", controlnet.CANNY_THRESHOLDS[1])):
        value = getattr(unit, name)
        if value not in (None, -1) and value != default:
            refuse(name, f"genkit's canny uses A1111's thresholds {controlnet.CANNY_THRESHOLDS[0]} and "
                         f"{controlnet.CANNY_THRESHOLDS[1]}: send {default} or -1")
