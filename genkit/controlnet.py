"""ControlNet: steer an image with a control image (edges, a pose, a depth map) through a ControlNet model, as
AUTOMATIC1111's sd-webui-controlnet does, composed from diffusers' ControlNet models and pipelines.

A `Control` is one of A1111's ControlNet units: a ControlNet `model` (a diffusers folder, or one `.safetensors`
file), the control `image`, a `preprocessor` that turns the image into what the model reads, its `weight` and the
part of the denoising it acts in (`start`, `end`: fractions of the steps, A1111's guidance_start/guidance_end).
Several units steer one image together (diffusers' MultiControlNet: their residuals are summed).

    genkit generate "a red circle" --control model=cn/canny,image=edges.png,preprocessor=canny,weight=0.8
    pipe.generate(["a red circle"], control=[Control("cn/canny", "edges.png", preprocessor="canny")])

What genkit does, and where:

- the control image is fitted to the output size as A1111's default resize mode, "Crop and Resize", does: scaled
  (Lanczos) until it covers width x height, then cut to it around its centre (`fit`); the preprocessor then runs
  at the output size (A1111's "Pixel Perfect"). Built-in preprocessors need no weights: `canny` (OpenCV's Canny
  edges at A1111's default thresholds, 100 and 200: pip install 'genkit[controlnet]') and `none` (the image is
  already a control map). Preprocessors that need their own detector's weights (depth, pose, lineart, ...) are
  not built in: run the detector yourself and pass its map with preprocessor=none.
- the model is loaded once per pipeline, on its device and in its dtype, checked against the family (a ControlNet
  of another family or base model is one line naming both) and hashed for the record (`load`);
- which diffusers classes and pipeline a family uses is the family's answer (`Family.controlnet_classes`,
  `control_pipe`, `control_args`, `controlnet_misfit`, `new_controlnet`): nothing here names a family. Families
  without a ControlNet in diffusers refuse `--control` in one line.
- the record holds, per unit, the model's path, name and digest (the weights file's sha256, 12 hex digits, as a
  LoRA's), the control image's path and sha256, the preprocessor, weight, start and end; `genkit replay` reads the
  image again (from its recorded path, else beside the replayed image) and checks both digests (`from_record`).

Jobs with different controls never share a batch (`batch_key`: models, preprocessors, weights, bounds); jobs whose
one unit differs only in its control image do, each row with its own image (every family's pipeline takes one per row
for one ControlNet; with several, diffusers' SDXL pipeline takes one image per ControlNet for the whole batch, so
there the images are part of the key, for every family alike).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from genkit.errors import GenkitError, term

PREPROCESSORS = ("none", "canny")  # built in (no weights needed)
CANNY_THRESHOLDS = (100, 200)  # A1111's canny defaults (low, high): sd-webui-controlnet's "Canny Low/High Threshold"
MAX_WEIGHT = 2.0  # A1111's Control Weight slider runs from 0 to 2
# the keys of a unit ("model=...,image=..."): genkit's, and A1111's unit fields for the same things
KEYS = {"model": "model", "image": "image", "preprocessor": "preprocessor", "module": "preprocessor",
        "weight": "weight", "start": "start", "guidance_start": "start", "end": "end", "guidance_end": "end"}
RECORD_EXTRA = ("name", "model_sha256", "image_sha256")  # a record's own keys, read back with it
_SPLIT = re.compile(r",(?=\s*[A-Za-z_]+\s*=)")  # at ",key=": a comma inside a path stays in the path


@dataclass(frozen=True)
class Control:
    """One ControlNet unit. `model`: a ControlNet folder (config.json and its weights) or `.safetensors` file;
    `image`: the control image (a path, PIL image or array; in a planned Job a genkit.edit.Picture)."""

    model: str | os.PathLike
    image: object
    preprocessor: str = "none"  # "canny" or "none" (the image is the control map)
    weight: float = 1.0  # how strongly it steers (A1111's Control Weight), 0 to 2; 0 changes nothing
    start: float = 0.0  # the fraction of the steps it starts acting at (A1111's guidance_start)
    end: float = 1.0  # the fraction of the steps it stops acting at (A1111's guidance_end)
    name: str | None = None  # the model's short name (its folder's or file's): filled by the plan
    model_sha256: str | None = None  # the weights' digest (12 hex digits, as a LoRA's): filled by the plan

    def key(self) -> tuple:
        """What jobs sharing a batch must share of this unit: all but the image."""
        return (str(self.model), self.preprocessor, self.weight, self.start, self.end)

    def record(self) -> dict:
        """The unit as an image's record holds it (its image as where it was read from, with its sha256)."""
        image, digest = getattr(self.image, "source", None), getattr(self.image, "sha256", None)
        return {"model": str(self.model), "name": self.name, "model_sha256": self.model_sha256, "image": image,
                "image_sha256": digest, "preprocessor": self.preprocessor, "weight": self.weight,
                "start": self.start, "end": self.end}


# --- reading units --------------------------------------------------------------------------------------------------


def parse(spec) -> Control:
    """A unit from "model=PATH,image=PATH[,preprocessor=canny|none][,weight=W][,start=S][,end=E]" (A1111's words
    module, guidance_start and guidance_end too), a dict of those keys (an image record's included) or a Control;
    checked (`check`). GenkitError about `control` naming the value and the fix."""
    if isinstance(spec, Control):
        return check(spec)
    if isinstance(spec, str):
        fields = _split(spec)
    elif isinstance(spec, dict):
        fields = {key: value for key, value in spec.items() if key not in RECORD_EXTRA or key == "image_sha256"}
    else:
        raise GenkitError(f"{spec!r:.60}: a ControlNet unit is \"model=PATH,image=PATH[,preprocessor=canny][,"
                          "weight=1][,start=0][,end=1]\", a dict of those keys or a genkit.controlnet.Control",
                          param="control")
    wanted = fields.pop("image_sha256", None)
    unknown = [key for key in fields if key not in KEYS]
    if unknown:
        raise GenkitError(f"{unknown[0]}: not a ControlNet unit key (keys: model, image, preprocessor, weight, start, "
                          "end)", param="control")
    values = {}
    for key, value in fields.items():
        name = KEYS[key]
        if name in values:
            raise GenkitError(f"{key}: {name} is given twice in one unit (keep one)", param="control")
        values[name] = _number(key, value) if name in ("weight", "start", "end") else value
    for required in ("model", "image"):
        if not values.get(required):
            raise GenkitError(f"{_show(spec)}: needs {required}=PATH (a unit is model=PATH,image=PATH[,...])",
                              param="control")
    unit = check(Control(**values))
    if wanted is not None and isinstance(unit.image, (str, os.PathLike)):
        from genkit.images import sha256_of

        if sha256_of(unit.image) != wanted:
            raise GenkitError(f"image={unit.image}: not the control image recorded (sha256 differs); restore the "
                              "original or drop image_sha256", param="control")
    return unit


def units(given) -> tuple[Control, ...]:
    """`control` as a call or a prompt gives it (None, one unit or a list of them) as checked Controls."""
    if given is None:
        return ()
    if isinstance(given, (str, dict, Control)):
        given = [given]
    return tuple(parse(spec) for spec in given)


def _split(text: str) -> dict:
    fields = {}
    for part in filter(None, (p.strip() for p in _SPLIT.split(text.strip()))):
        key, sep, value = part.partition("=")
        if not sep:
            raise GenkitError(f"{text!r}: {part!r} is not KEY=VALUE (write model=PATH,image=PATH,preprocessor=canny)",
                              param="control")
        key = key.strip().lower()
        if key in fields:
            raise GenkitError(f"{key}: given twice in {text!r} (keep one)", param="control")
        fields[key] = value.strip()
    return fields


def _number(key: str, value) -> float:
    if isinstance(value, bool):
        raise GenkitError(f"{key}={value}: not a number", param="control")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GenkitError(f"{key}={value}: not a number (e.g. {key}={1 if key in ('weight', 'end') else 0})",
                          param="control") from None


def _show(spec) -> str:
    return spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in dict(spec).items()) \
        if isinstance(spec, dict) else repr(spec)


def check(unit: Control) -> Control:
    """The unit's values checked (model found, preprocessor known and installed, numbers in range), before any work."""
    model = Path(os.fspath(unit.model)).expanduser()
    if not model.exists():
        raise GenkitError(f"model={unit.model}: no such ControlNet folder or file (pass a diffusers ControlNet folder, "
                          "with config.json beside its weights, or a .safetensors file)", param="control")
    if model.is_file() and model.suffix.lower() != ".safetensors":
        raise GenkitError(f"model={unit.model}: a ControlNet file must be .safetensors ({model.suffix} files can run "
                          "code when loaded; convert it, or pass its diffusers folder)", param="control")
    preprocessor = str(unit.preprocessor).strip().lower()
    if preprocessor not in PREPROCESSORS:
        raise GenkitError(f"preprocessor={unit.preprocessor}: not built in (built in: canny, none); a detector that "
                          "needs its own weights (depth, pose, lineart, ...) is run by you: pass its map as the image "
                          "with preprocessor=none", param="control")
    if preprocessor == "canny":
        require_opencv()
    weight, start, end = unit.weight, unit.start, unit.end
    for key, value in (("weight", weight), ("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise GenkitError(f"{key}={value!r}: not a finite number", param="control")
    if not 0 <= weight <= MAX_WEIGHT:
        raise GenkitError(f"weight={weight:g}: must be from 0 to {MAX_WEIGHT:g} (A1111's range: 1 is full strength, 0 "
                          "turns the unit off)", param="control")
    for key, value in (("start", start), ("end", end)):
        if not 0 <= value <= 1:
            raise GenkitError(f"{key}={value:g}: must be from 0 to 1 (a fraction of the steps)", param="control")
    if start >= end:
        raise GenkitError(f"start={start:g},end={end:g}: the unit would act in no step (start must be below end)",
                          param="control")
    image = unit.image
    if isinstance(image, (str, os.PathLike)) and not Path(os.fspath(image)).expanduser().is_file():
        raise GenkitError(f"image={image}: no such image file (check the path)", param="control")
    return replace(unit, model=str(model), preprocessor=preprocessor, weight=float(weight), start=float(start),
                   end=float(end))


def require_opencv() -> None:
    """Refuse in one line when the canny preprocessor's OpenCV is not installed."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise GenkitError("preprocessor=canny needs OpenCV: pip install 'genkit[controlnet]' (or give a ready edge "
                          "map with preprocessor=none)", param="control") from None


# --- the engine's side: planning, batching, calling ------------------------------------------------------------------


def plan(pipeline, given, edits: dict, read: dict) -> dict:
    """A prompt's `control` job field ({} without one): its units checked, their models loaded (once per pipeline)
    and their images read (once per plan). Refused in one line where the family has no ControlNet, or takes fewer
    units or no start/end, or the job edits an input or runs the hires fix."""
    given = units(given)
    if not given:
        return {}
    family = pipeline.family
    if not family.controlnet_classes:
        raise GenkitError(f"{family.title} models have no ControlNet in diffusers (families with one: "
                          f"{', '.join(_families_with())}); drop {term('control')}", param="control")
    if len(given) > 1 and not family.controlnet_several:
        raise GenkitError(f"{len(given)} units: {family.title}'s ControlNet pipeline in diffusers takes one "
                          f"ControlNet at a time (pass one {term('control')})", param="control")
    if not family.controlnet_bounds and any((unit.start, unit.end) != (0.0, 1.0) for unit in given):
        raise GenkitError(f"start/end: {family.title}'s ControlNet pipeline in diffusers acts in every step (drop "
                          "start and end)", param="control")
    if edits.get("image") is not None or edits.get("hires_scale") is not None:
        what = term("image") if edits.get("image") is not None else term("hires_scale")
        raise GenkitError(f"steers text-to-image; with {what} it is not offered yet (drop one of them)",
                          param="control")
    planned = []
    for unit in given:
        loaded = load(pipeline, unit.model)
        planned.append(replace(unit, name=loaded.name, model_sha256=loaded.sha256,
                               image=_picture(unit.image, read)))
    return {"control": tuple(planned)}


def _picture(image, read: dict):
    from genkit import edit

    if hasattr(image, "sha256") and hasattr(image, "pixels"):  # already read (a replayed or served job)
        return image
    try:
        return edit.picture(image, "control", read)
    except GenkitError as exc:
        raise GenkitError(f"image={exc.message}", param="control") from None


def _families_with() -> list[str]:
    from genkit import families

    return [family.name for family in families.all_families() if family.controlnet_classes]


def batch_key(controls) -> tuple | None:
    """What jobs of one batch share of their controls, or None without any: all but the image of one unit (each row
    reads its own), everything of several (diffusers' pipelines read one image per ControlNet for the whole batch)."""
    if not controls:
        return None
    several = len(controls) > 1
    return tuple(unit.key() + ((getattr(unit.image, "sha256", unit.image),) if several else ()) for unit in controls)


def pipe_for(pipeline, job):
    """The family's ControlNet pipeline for the job's models, made once (sharing the loaded components)."""
    paths = tuple(str(unit.model) for unit in job.control)
    key = ("control", paths)
    if key not in pipeline._edit_pipes:
        models = [load(pipeline, path).model for path in paths]
        pipe = pipeline.family.control_pipe(pipeline.pipe, models)
        pipe.set_progress_bar_config(**getattr(pipeline.pipe, "_progress_bar_config", {}))
        pipeline.family.apply_attention(pipe, pipeline.attention)
        pipeline._edit_pipes[key] = pipe
    return pipeline._edit_pipes[key]


def call_args(pipeline, pipe, batch, generators) -> dict:
    """The ControlNet arguments of the batch's call: each unit's control image for every row (fitted to the size,
    then preprocessed), the weights and bounds, in the family's pipeline's words."""
    first = batch[0]
    images = [[control_image(job.control[k].image.pixels, unit.preprocessor, first.width, first.height)
               for job in batch] for k, unit in enumerate(first.control)]
    return pipeline.family.control_args(pipe, batch, generators, list(first.control), images)


def control_image(pixels, preprocessor: str, width: int, height: int):
    """The control map a model reads: the image fitted to width x height ("Crop and Resize"), then preprocessed."""
    fitted = fit(pixels, width, height)
    return canny(fitted) if preprocessor == "canny" else fitted


def fit(image, width: int, height: int):
    """A1111's "Crop and Resize": scaled (Lanczos) until it covers width x height, then its centre cut to that size."""
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def canny(image, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]):
    """Canny edges (Canny 1986) of an RGB image, white on black in three channels, as sd-webui-controlnet's canny
    preprocessor makes them (`cv2.Canny` on the RGB pixels, A1111's thresholds)."""
    import numpy as np
    from PIL import Image

    require_opencv()
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (height, width), 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def infotext_fields(record: dict) -> dict:
    """A record's units as sd-webui-controlnet writes them in A1111's infotext: `ControlNet 0: "Module: canny, ..."`."""
    out = {}
    for k, unit in enumerate(record.get("control") or ()):
        out[f"ControlNet {k}"] = (
            f"\"Module: {unit['preprocessor']}, Model: {unit.get('name')}, Weight: {unit['weight']:g}, Resize Mode: "
            f"Crop and Resize, Guidance Start: {unit['start']:g}, Guidance End: {unit['end']:g}, Pixel Perfect: True, "
            f"Control Mode: Balanced\"")
    return out


# --- models ---------------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A ControlNet a pipeline holds: the model, its short name and its weights' digest."""

    model: object
    name: str
    path: str
    sha256: str


def load(pipeline, path) -> Loaded:
    """The ControlNet at `path` for `pipeline` (a genkit Pipeline), loaded the first time it is asked for: a folder
    by its config's class (one of the family's `controlnet_classes`), a single file by the family; checked against
    the model (`Family.controlnet_misfit`), on the pipeline's device and in its dtype."""
    path = str(Path(os.fspath(path)).expanduser())
    if path in pipeline.controlnets:
        return pipeline.controlnets[path]
    family, folder = pipeline.family, Path(path)
    if not family.controlnet_classes:
        raise GenkitError(f"{family.title} models have no ControlNet in diffusers; drop {term('control')}",
                          param="control")
    from genkit.loader import load_errors

    with load_errors(path, True):
        if folder.is_dir():
            model = _from_folder(folder, family, pipeline.dtype)
        else:
            model = family.load_controlnet_file(pipeline.pipe, folder, pipeline.dtype)
    problem = family.controlnet_misfit(pipeline.pipe, model)
    if problem:
        raise GenkitError(f"model={path} does not fit {pipeline.name}: {problem} (was it made for another base "
                          "model?)", param="control")
    model.to(pipeline.device).eval().requires_grad_(False)
    loaded = Loaded(model, folder.stem if folder.is_file() else folder.name, path, digest(folder))
    pipeline.controlnets[path] = loaded
    return loaded


def _from_folder(folder: Path, family, dtype):
    import json

    import diffusers

    config = folder / "config.json"
    if not config.is_file():
        raise GenkitError(f"model={folder} has no config.json, so it is not a diffusers ControlNet folder (save one "
                          "with controlnet.save_pretrained(folder), or pass its .safetensors file)", param="control")
    name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    if name not in family.controlnet_classes:
        made_for = [f.title for f in _all() if name in f.controlnet_classes]
        why = f"a ControlNet for {' or '.join(made_for)}" if made_for else "not a ControlNet genkit reads"
        raise GenkitError(f"model={folder} is a {name}, {why}; {family.title} models take "
                          f"{' or '.join(family.controlnet_classes)}", param="control")
    weights = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    if not weights:
        raise GenkitError(f"model={folder} holds no .safetensors weights (pickle files can run code when loaded: "
                          "convert them)", param="control")
    return getattr(diffusers, name).from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)


def _all():
    from genkit import families

    return families.all_families()


def weights_files(path: Path) -> list[Path]:
    """The files a ControlNet's weights are in: a folder's .safetensors (sharded ones too), or the file itself."""
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors") if path.is_dir() else [path]


def digest(path: Path) -> str:
    """The weights' sha256, 12 hex digits as a LoRA's: of the one weights file, or of several files' digests."""
    import hashlib

    from genkit.files import file_sha256

    files = weights_files(Path(path))
    if len(files) == 1:
        return file_sha256(files[0])[:12]
    joined = "".join(f"{file.name} {file_sha256(file)}\n" for file in files)
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def preload(pipeline, paths) -> None:
    """Load `genkit.load`'s `controlnet` (paths) into the pipeline now, each checked against it."""
    for path in paths:
        load(pipeline, path)


def check_paths(paths) -> list[str]:
    """`genkit.load`'s `controlnet` (a path or a list of them), each found, before the slow model load."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [check(Control(path, None)).model for path in paths]


# --- replay ---------------------------------------------------------------------------------------------------------


def from_record(entries, beside: Path) -> tuple[Control, ...]:
    """The units of an image's record, for `genkit replay`: each control image read again from its recorded path,
    else beside the replayed image, and checked against its sha256; each model checked against its digest."""
    from genkit import edit

    found = []
    for entry in entries:
        recorded, want = entry.get("image"), entry.get("image_sha256")
        candidates = [] if not recorded or recorded.startswith("<") else [recorded, str(beside / Path(recorded).name)]
        candidates = [c for c in dict.fromkeys(candidates) if Path(c).is_file()]
        picture = next((p for p in (edit.picture(c, "control") for c in candidates) if p.sha256 == want), None)
        if picture is None:
            where = "was given in memory" if not candidates and str(recorded).startswith("<") else \
                f"was read from {recorded}, not found with its sha256"
            raise GenkitError(f"this image was made with a control image that {where}; put it back beside the image")
        model = Path(entry["model"])
        if not model.exists():
            raise GenkitError(f"this image was made with ControlNet {model}, which is no longer there (put it back)")
        if entry.get("model_sha256") and digest(model) != entry["model_sha256"]:
            raise GenkitError(f"ControlNet {model} is not the one this image was made with (sha256 {digest(model)}, "
                              f"recorded {entry['model_sha256']}); put the original back")
        found.append(Control(str(model), picture, entry.get("preprocessor", "none"), float(entry.get("weight", 1.0)),
                             float(entry.get("start", 0.0)), float(entry.get("end", 1.0)), entry.get("name"),
                             entry.get("model_sha256")))
    return tuple(found)
