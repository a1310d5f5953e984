"""IP-Adapter: steer an image with a reference image (Ye et al. 2023, https://arxiv.org/abs/2308.06721), read by
a CLIP image encoder and fed to the denoiser's cross-attention beside the prompt, as diffusers' `load_ip_adapter`,
`set_ip_adapter_scale` and `ip_adapter_image` do, on SD 1.x/2.x, SDXL (h94/IP-Adapter's files) and Flux.1 (XLabs').

An `IPAdapter` is the adapter's weights (`model`: a `.safetensors` file, or a folder holding exactly one), the
reference `image` and its `scale` (0 to 2; 0 is the image without the adapter, pixel for pixel). The CLIP image
encoder it was trained with is the `image_encoder/` folder beside the weights file (config.json and .safetensors
weights), h94's layout; for XLabs' Flux adapter, put openai/clip-vit-large-patch14 (or a link to it) there.

    genkit generate "a cat" --ip-adapter IP-Adapter/models/ip-adapter_sd15.safetensors --ip-image ref.png:0.6
    pipe.generate(["a cat"], ip_adapter=IPAdapter("IP-Adapter/models/ip-adapter_sd15.safetensors", "ref.png", 0.6))

What genkit does, and where:

- the unit is checked before the model loads (`check`: the weights, the image encoder, the image read, the scale);
  the plan refuses it in one line on a family whose diffusers pipeline loads no IP-Adapter (`Family.ip_adapter`),
  with an edit, the hires fix or a ControlNet (not offered yet), and an adapter made for another family (its keys'
  layout, `Family.ip_adapter_layout`) or base model (its sizes, `Family.ip_adapter_misfit`);
- the adapter is loaded once per pipeline (`load`), by the family's diffusers loader (`Family.load_ip_adapter`) into
  a pipeline made of the loaded models plus the image encoder (genkit.families.shared.sharing). Loading replaces the
  denoiser's attention processors and adds its image projection, and the denoiser is shared with every other job
  (genkit serve's too), so the adapter's processors and projection are kept aside and put in place for the batches
  that use it only (`installed`): a job without it runs on exactly the processors it ran on before;
- jobs with another adapter, image or scale never share a batch (`batch_key`): diffusers reads one reference image
  per adapter for the whole call, and the scale is the adapter's, not a row's;
- the record holds the adapter's path, name and digest (the weights file's sha256, 12 hex digits, as a LoRA's), the
  image encoder's digest, the reference image's path and sha256, and the scale; `genkit replay` reads the image again
  (from its recorded path, else beside the replayed image) and checks every digest (`from_record`).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from pathlib import Path

from genkit.controlnet import MAX_WEIGHT as MAX_SCALE  # sd-webui-controlnet's IP-Adapter units: a Control Weight, 0-2
from genkit.controlnet import digest
from genkit.errors import GenkitError, term

ENCODER = "image_encoder"  # the image encoder's folder beside the weights file (h94/IP-Adapter's layout)
KEYS = ("model", "image", "scale")  # what a unit is given as (a dict's keys; a record adds the digests and name)


@dataclass(frozen=True)
class IPAdapter:
    """An IP-Adapter and its reference image. `model`: the weights' .safetensors file (or a folder holding exactly one),
    with the CLIP image encoder in `image_encoder/` beside it; `image`: a path, PIL image or array (in a planned Job a
    genkit.edit.Picture); `scale`: 0 to 2, 1 the adapter's full strength, 0 none."""

    model: str | os.PathLike
    image: object
    scale: float = 1.0
    name: str | None = None  # the weights file's stem: filled by the plan
    model_sha256: str | None = None  # the weights' digest (12 hex digits, as a LoRA's): filled by the plan
    encoder_sha256: str | None = None  # the image encoder's: filled by the plan

    def key(self) -> tuple:
        """What jobs sharing a batch must share: everything (diffusers reads one reference image per call)."""
        return (str(self.model), getattr(self.image, "sha256", self.image), self.scale)

    def record(self) -> dict:
        """The unit as an image's record holds it (its image as where it was read from, with its sha256)."""
        return {"model": str(self.model), "name": self.name, "model_sha256": self.model_sha256,
                "image_encoder_sha256": self.encoder_sha256, "image": getattr(self.image, "source", None),
                "image_sha256": getattr(self.image, "sha256", None), "scale": self.scale}


# --- reading and checking ---------------------------------------------------------------------------------------------


def parse(given) -> IPAdapter | None:
    """`ip_adapter` as a call gives it (None, an IPAdapter, or a dict of model, image and scale) checked."""
    if given is None:
        return None
    if isinstance(given, dict):
        unknown = [key for key in given if key not in KEYS]
        if unknown:
            raise GenkitError(f"{unknown[0]}: not an IP-Adapter key (keys: model, image, scale)", param="ip_adapter")
        if not given.get("model") or given.get("image") is None:
            raise GenkitError(f"{given!r:.80}: needs model (the adapter's file or folder) and image (the reference)",
                              param="ip_adapter")
        given = IPAdapter(given["model"], given["image"], given.get("scale", 1.0))
    if not isinstance(given, IPAdapter):
        raise GenkitError(f"{given!r:.60}: an IP-Adapter is a genkit.ipadapter.IPAdapter(model, image, scale) or a "
                          "dict of those keys", param="ip_adapter")
    return check(given)


def from_cli(model, image) -> IPAdapter | None:
    """The command line's `--ip-adapter PATH --ip-image IMAGE[:SCALE]` as a checked unit (both or neither)."""
    if model is None and image is None:
        return None
    if model is None:
        raise GenkitError(f"{image}: needs the adapter it steers through (pass --ip-adapter PATH)", param="ip_image")
    if image is None:
        raise GenkitError(f"{model}: needs a reference image (pass --ip-image IMAGE[:SCALE])", param="ip_adapter")
    path, sep, tail = str(image).rpartition(":")
    scale = 1.0
    if sep and path and not Path(image).exists():  # IMAGE:SCALE (a path with a colon of its own stays a path)
        try:
            scale = float(tail)
        except ValueError:
            raise GenkitError(f"{image}: the scale after the last ':' is not a number (write IMAGE:0.6)",
                              param="ip_image") from None
        image = path
    return check(IPAdapter(model, image, scale))


def check(unit: IPAdapter) -> IPAdapter:
    """The unit's values checked before any work: the weights file and its image encoder found, the scale in range,
    a reference image file read. GenkitError naming the value and the fix."""
    weights = weights_file(unit.model)
    encoder_folder(weights)
    scale = unit.scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise GenkitError(f"scale {scale!r}: not a finite number (e.g. 0.6)", param="ip_image")
    if not 0 <= scale <= MAX_SCALE:
        raise GenkitError(f"scale {scale:g}: must be from 0 to {MAX_SCALE:g} (1 is the adapter's full strength, 0 "
                          "turns it off)", param="ip_image")
    image = unit.image
    if isinstance(image, (str, os.PathLike)):
        if not Path(os.fspath(image)).expanduser().is_file():
            raise GenkitError(f"{image}: no such image file (check the path)", param="ip_image")
        image = picture(image, {})
    return replace(unit, model=str(weights), image=image, scale=float(scale))


def weights_file(path) -> Path:
    """The adapter's weights: `path` itself (a .safetensors file), or the one .safetensors file in folder `path`."""
    given = Path(os.fspath(path)).expanduser()
    if not given.exists():
        raise GenkitError(f"{path}: no such IP-Adapter file or folder (pass the adapter's .safetensors file, e.g. "
                          "IP-Adapter/models/ip-adapter_sd15.safetensors, with image_encoder/ beside it)",
                          param="ip_adapter")
    if given.is_dir():
        found = sorted(p for p in given.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            what = f"{len(found)} .safetensors files ({names})" if found else "no .safetensors file"
            raise GenkitError(f"{path} holds {what}: pass the adapter's weights file itself", param="ip_adapter")
        return found[0]
    if given.suffix.lower() != ".safetensors":
        raise GenkitError(f"{path}: an IP-Adapter must be a .safetensors file ({given.suffix} files can run code when "
                          "loaded; h94/IP-Adapter and XLabs publish .safetensors ones)", param="ip_adapter")
    return given


def encoder_folder(weights: Path) -> Path:
    """The CLIP image encoder beside the weights file: `image_encoder/`, its config.json and .safetensors weights."""
    folder = weights.parent / ENCODER
    if not (folder / "config.json").is_file():
        raise GenkitError(f"{weights}: no image encoder beside it (put the CLIP image encoder the adapter was trained "
                          f"with in {folder}: config.json and model.safetensors; h94's image_encoder/, or "
                          "openai/clip-vit-large-patch14 for XLabs' Flux adapter)", param="ip_adapter")
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise GenkitError(f"{folder} holds no .safetensors weights (pickle files can run code when loaded: convert "
                          "them)", param="ip_adapter")
    return folder


def picture(image, read: dict):
    """The reference image read once per plan (a genkit.edit.Picture); unreadable: one line about --ip-image."""
    from genkit import edit

    if hasattr(image, "sha256") and hasattr(image, "pixels"):  # already read (a checked unit, a replayed job)
        return image
    try:
        return edit.picture(image, "image", read)
    except GenkitError as exc:
        raise GenkitError(exc.message, param="ip_image") from None


# --- the engine's side: planning, batching, calling ------------------------------------------------------------------


def plan(pipeline, given, edits: dict, read: dict) -> dict:
    """A job's `ip_adapter` field ({} without one): the unit checked, its adapter loaded (once per pipeline) and its
    image read. Refused in one line where the family's pipeline takes no IP-Adapter, or with an edit, the hires fix
    or a ControlNet."""
    unit = parse(given)
    if unit is None:
        return {}
    family = pipeline.family
    if not family.ip_adapter:
        raise GenkitError(f"{family.title} models take no IP-Adapter in diffusers (families that do: "
                          f"{', '.join(_families_with())}); drop {term('ip_adapter')}", param="ip_adapter")
    for other in ("image", "hires_scale", "control"):
        if edits.get(other) is not None:
            raise GenkitError(f"steers text-to-image; with {term(other)} it is not offered yet (drop one of them)",
                              param="ip_adapter")
    loaded = load(pipeline, unit.model)
    return {"ip_adapter": replace(unit, name=loaded.name, model_sha256=loaded.sha256,
                                  encoder_sha256=loaded.encoder_sha256, image=picture(unit.image, read))}


def _families_with() -> list[str]:
    from genkit import families

    return [family.name for family in families.all_families() if family.ip_adapter]


def batch_key(unit) -> tuple | None:
    """What jobs of one batch share of their IP-Adapter (all of it), or None without one."""
    return None if unit is None else unit.key()


def pipe_for(pipeline, job):
    """The family's pipeline with the job's adapter's image encoder (sharing the loaded models)."""
    return load(pipeline, job.ip_adapter.model).pipe


def call_args(pipeline, pipe, batch) -> dict:
    """The call's IP-Adapter argument: the reference image (the pipeline's image processor fits it to the encoder)."""
    return {"ip_adapter_image": batch[0].ip_adapter.image.pixels.convert("RGB")}


def installed(pipeline, job):
    """A context in which the job's adapter steers the denoiser at its scale; after it, the denoiser is as before."""
    import contextlib

    if job.ip_adapter is None:
        return contextlib.nullcontext()
    return _installed(pipeline, load(pipeline, job.ip_adapter.model), job.ip_adapter.scale)


def _installed(pipeline, loaded: "Loaded", scale: float):
    import contextlib

    @contextlib.contextmanager
    def context():
        denoiser = pipeline.family.denoiser(pipeline.pipe)
        before = _state(denoiser)
        try:
            _put(denoiser, loaded.state)
            loaded.pipe.set_ip_adapter_scale(scale)
            yield
        finally:
            _put(denoiser, before)

    return context()


def _state(denoiser) -> tuple:
    """What loading an IP-Adapter changes in a denoiser: its attention processors, its image projection, its config's
    word for that projection (the last two absent from a transformer that never held an adapter)."""
    return (dict(denoiser.attn_processors), getattr(denoiser, "encoder_hid_proj", _ABSENT),
            getattr(denoiser.config, "encoder_hid_dim_type", _ABSENT))


def _put(denoiser, state: tuple) -> None:
    processors, projection, kind = state
    denoiser.set_attn_processor(dict(processors))
    for owner, name, value in ((denoiser, "encoder_hid_proj", projection),
                               (denoiser.config, "encoder_hid_dim_type", kind)):  # as diffusers' loader sets them
        if value is not _ABSENT:
            setattr(owner, name, value)
        elif name in vars(owner) or name in getattr(owner, "_modules", {}):
            delattr(owner, name)


_ABSENT = object()


# --- models ---------------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """An IP-Adapter a pipeline holds: the pipeline with its image encoder, the denoiser's state with the adapter in
    place (`installed` puts it there for a batch), its name and digests."""

    pipe: object
    state: tuple
    name: str
    path: str
    sha256: str
    encoder_sha256: str


def load(pipeline, path) -> Loaded:
    """The IP-Adapter at `path` for `pipeline` (a genkit Pipeline), loaded the first time it is asked for: its layout
    and sizes checked against the family and the denoiser, its image encoder on the pipeline's device and in its
    dtype, loaded by the family's diffusers loader and kept aside (the denoiser left as it was)."""
    weights = weights_file(path)
    key = str(weights)
    if key in pipeline.ip_adapters:
        return pipeline.ip_adapters[key]
    family = pipeline.family
    if not family.ip_adapter:
        raise GenkitError(f"{family.title} models take no IP-Adapter in diffusers; drop {term('ip_adapter')}",
                          param="ip_adapter")
    encoder = encoder_folder(weights)
    problem = _misfit(family, pipeline.pipe, _shapes(weights))
    if problem:
        raise GenkitError(f"{weights} does not fit {pipeline.name}: {problem}", param="ip_adapter")
    from genkit.families.shared import sharing
    from genkit.loader import load_errors

    with load_errors(str(encoder), True):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder), dtype=pipeline.dtype,
                                                                      use_safetensors=True, local_files_only=True)
    image_encoder.to(pipeline.device).eval().requires_grad_(False)
    size = image_encoder.config.image_size  # as diffusers' loader makes the processor when a pipeline has none
    pipe = sharing(type(pipeline.pipe), pipeline.pipe, image_encoder=image_encoder,
                   feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    denoiser = family.denoiser(pipeline.pipe)
    before = _state(denoiser)
    try:
        with load_errors(str(weights), True):
            family.load_ip_adapter(pipe, weights)
        state = _state(denoiser)
    finally:
        _put(denoiser, before)
    problem = _encoder_misfit(state[1], image_encoder)
    if problem:
        raise GenkitError(f"{weights}: {problem} (put the image encoder it was trained with in {encoder})",
                          param="ip_adapter")
    loaded = Loaded(pipe, state, weights.stem, key, digest(weights), digest(encoder))
    pipeline.ip_adapters[key] = loaded
    return loaded


def _shapes(weights: Path) -> dict[str, tuple]:
    """The weights file's tensor names and shapes, read from its header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as opened:
            return {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}
    except (SafetensorError, OSError) as exc:
        raise GenkitError(f"{weights}: not a readable .safetensors file ({exc}); download it again",
                          param="ip_adapter") from None


def _misfit(family, pipe, shapes: dict) -> str | None:
    """Why an adapter of these tensors cannot steer `pipe`: another family's layout, or other sizes."""
    def fits(layout):
        return bool(shapes) and all(key.startswith(layout) for key in shapes)

    if not fits(family.ip_adapter_layout):
        made_for = [f.title for f in _all() if f.ip_adapter and f.ip_adapter_layout != family.ip_adapter_layout
                    and fits(f.ip_adapter_layout)]
        theirs = f"an IP-Adapter for {' or '.join(dict.fromkeys(made_for))}" if made_for else \
            "not an IP-Adapter in a layout genkit reads"
        return (f"it is {theirs}; {family.title} models take one whose keys start with "
                f"{' or '.join(family.ip_adapter_layout)}")
    return family.ip_adapter_misfit(pipe, shapes)


def _encoder_misfit(projection, image_encoder) -> str | None:
    """Why the adapter's image projection cannot read this image encoder's output (their widths differ), or None."""
    from diffusers.models.embeddings import ImageProjection

    layer = projection.image_projection_layers[0]
    config = image_encoder.config
    if isinstance(layer, ImageProjection):
        wants, gives = layer.image_embeds.in_features, config.projection_dim
    elif hasattr(layer, "proj_in"):  # IP-Adapter Plus' resampler reads the encoder's hidden states
        wants, gives = layer.proj_in.in_features, config.hidden_size
    else:
        return None
    if wants == gives:
        return None
    return f"its image projection reads {wants}-wide image features and the image encoder beside it gives {gives}"


def _all():
    from genkit import families

    return families.all_families()


# --- replay ---------------------------------------------------------------------------------------------------------


def from_record(entry: dict, beside: Path) -> IPAdapter:
    """An image record's IP-Adapter, for `genkit replay`: its reference image read again from its recorded path, else
    beside the replayed image, and checked against its sha256; the adapter and its image encoder against theirs."""
    from genkit import edit

    recorded, want = entry.get("image"), entry.get("image_sha256")
    candidates = [] if not recorded or recorded.startswith("<") else [recorded, str(beside / Path(recorded).name)]
    candidates = [c for c in dict.fromkeys(candidates) if Path(c).is_file()]
    found = next((p for p in (edit.picture(c, "image") for c in candidates) if p.sha256 == want), None)
    if found is None:
        where = "was given in memory" if str(recorded).startswith("<") else \
            f"was read from {recorded}, not found with its sha256"
        raise GenkitError(f"this image was made with an IP-Adapter reference image that {where}; put it back beside "
                          "the image")
    weights = Path(entry["model"])
    if not weights.is_file():
        raise GenkitError(f"this image was made with IP-Adapter {weights}, which is no longer there (put it back)")
    for what, path, recorded_digest in (("IP-Adapter", weights, entry.get("model_sha256")),
                                        ("its image encoder", weights.parent / ENCODER,
                                         entry.get("image_encoder_sha256"))):
        now = digest(path) if path.exists() else None
        if recorded_digest and now != recorded_digest:
            raise GenkitError(f"{what} {path} is not the one this image was made with (sha256 {now}, recorded "
                              f"{recorded_digest}); put the original back")
    return IPAdapter(str(weights), found, float(entry.get("scale", 1.0)), entry.get("name"), entry.get("model_sha256"),
                     entry.get("image_encoder_sha256"))
