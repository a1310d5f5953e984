"""Single-file models: a checkpoint in one file, as model sites, A1111 and ComfyUI keep them, and their model folders.

A file is an all-in-one checkpoint (every component in the original layouts: A1111's models/Stable-diffusion, ComfyUI's
models/checkpoints) or a denoiser alone (ComfyUI's models/unet and models/diffusion_models). What it is comes from the
tensor names in its header (no weights read), asked of each family (`Family.single_file_kind`); the configs,
tokenizers and scheduler (and, for a denoiser alone, the other components) come from a base: a diffusers folder or a
preset (`base`, `--base`, a preset's `base`, or the family's default preset, which must be on this machine), handed to
diffusers' `from_single_file` as `config=`, so nothing is downloaded (`Family.load_single_file`).

A models folder (`models_dir`, `--models-dir`, $GENKIT_MODELS_DIR: A1111's or ComfyUI's root, or its models/ folder)
lets `--model NAME` and `--lora NAME` name a file in it by its name, with or without the suffix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from genkit.errors import GenkitError, term

SAFE = (".safetensors", ".sft")
PICKLED = (".ckpt", ".pt", ".pth")  # can run code when loaded: only with allow_pickle
SUFFIXES = SAFE + PICKLED
CHECKPOINTS = ("Stable-diffusion", "checkpoints", "unet", "diffusion_models")  # A1111's, then ComfyUI's subfolders
LORAS = ("Lora", "loras")
MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on a header


class SingleFile(str):
    """A single file's path (a str, as every other model source) with what was found in it: `family`, `kind`
    ("checkpoint" or "denoiser") and the local diffusers folder `base` its configs come from."""

    family: object
    kind: str
    base: Path


def models_dir(given: str | os.PathLike | None = None) -> Path | None:
    """The models folder: `given`, else $GENKIT_MODELS_DIR, else none."""
    given = given or os.environ.get("GENKIT_MODELS_DIR")
    if not given:
        return None
    folder = Path(given).expanduser()
    if not folder.is_dir():
        raise GenkitError(f"{folder}: no such folder (name A1111's or ComfyUI's folder, which holds models/)",
                          param="models_dir")
    return folder


def subfolders(root: Path, names: tuple[str, ...]) -> list[Path]:
    """`root`'s model subfolders called `names`, under root/models/ or root itself (the models/ folder named)."""
    return [folder for name in names for folder in (root / "models" / name, root / name) if folder.is_dir()]


def find(name: str, names: tuple[str, ...], root: Path | None, suffixes: tuple[str, ...] = SUFFIXES) -> Path | None:
    """The file `name` (a relative path, with or without its suffix) in `root`'s subfolders `names`, or None."""
    if root is None or not name:
        return None
    name = str(name)
    for folder in subfolders(root, names):
        for candidate in (folder / name, *(folder / (name + suffix) for suffix in suffixes)):
            if candidate.is_file() and candidate.suffix in suffixes:
                return candidate
    return None


def listing(root: Path, allow_pickle: bool = False) -> list[dict]:
    """Every model file in `root`'s checkpoint and LoRA folders: name, folder, path and what it is (family or why not)."""
    rows = []
    for names, what in ((CHECKPOINTS, "model"), (LORAS, "lora")):
        for folder in subfolders(root, names):
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES):
                row = {"name": str(path.relative_to(folder).with_suffix("")), "folder": str(folder), "path": str(path),
                       "kind": what}
                if what == "model":
                    try:
                        keys = read_keys(path, allow_pickle)
                        family, row["kind"] = detect(path, keys)
                        row["family"] = family.name
                    except GenkitError as exc:
                        row["family"], row["error"] = None, str(exc)
                rows.append(row)
    return rows


def read_keys(path: Path, allow_pickle: bool = False) -> dict[str, tuple]:
    """Tensor name -> shape of a single file, read from its header alone (safetensors), or by unpickling it (only with
    `allow_pickle`). A truncated or foreign file is one GenkitError line naming what was found."""
    if path.suffix in PICKLED:
        return _pickle_keys(path, allow_pickle)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length < 2 or length > min(MAX_HEADER, size - 8):
            said = "not even the 8 bytes of its header's length" if length is None else \
                f"its first 8 bytes give a header of {length} bytes"
            raise GenkitError(f"{path}: not a safetensors file, or truncated: {size} bytes, {said} (download or "
                              "copy it again)", param="model")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GenkitError(f"{path}: not a safetensors file: its header is not JSON ({exc})", param="model") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(isinstance(v, dict) and "data_offsets" in v for v in tensors.values()):
        raise GenkitError(f"{path}: not a safetensors file: its header is not a table of tensors", param="model")
    end = 8 + length + max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if end > size:
        raise GenkitError(f"{path}: truncated: its header places tensors up to byte {end}, the file has {size} "
                          f"({100 * size // end}%; download or copy it again)", param="model")
    return {name: tuple(v.get("shape", ())) for name, v in tensors.items()}


def _pickle_keys(path: Path, allow_pickle: bool) -> dict[str, tuple]:
    if not allow_pickle:
        raise GenkitError(f"{path} is a pickle ({path.suffix}), which can run code when loaded; convert it to "
                          f"safetensors, or pass {term('allow_pickle')} if you trust it", param="allow_pickle")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # a damaged pickle raises whatever its bytes lead to
        raise GenkitError(f"{path}: could not be unpickled ({type(exc).__name__}: {str(exc)[:120]}); truncated or "
                          "not a checkpoint (download it again)", param="model") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise GenkitError(f"{path}: holds a {type(state).__name__}, not a table of tensors", param="model")
    return {name: tuple(getattr(value, "shape", ())) for name, value in state.items()}


def detect(path: Path, keys) -> tuple:
    """(family, kind) of a file whose tensors are `keys`, asked of every family; else one line saying what it holds."""
    from genkit import families
    from genkit.families.base import Family

    names = set(keys)
    for family in families.all_families():
        kind = family.single_file_kind(names)
        if kind:
            return family, kind
    readable = [f.title for f in families.all_families() if type(f).single_file_kind is not Family.single_file_kind]
    if not names:
        found = "no tensors"
    elif any(".lora_" in key or "lora_A" in key or key.startswith("lora_") for key in names):
        found = f"a LoRA ({len(names)} tensors; pass it with {term('lora')})"
    else:
        tops = {}
        for key in names:
            top = ".".join(key.split(".")[:2 if key.startswith("model.") else 1])
            tops[top] = tops.get(top, 0) + 1
        found = f"{len(names)} tensors under " + ", ".join(f"{k} ({n})" for k, n in sorted(tops.items())[:4])
    raise GenkitError(f"{path}: not a model genkit reads from one file: {found} (it reads {', '.join(readable)} "
                      "files in their original layouts)", param="model")


def base_folder(path: Path, family, kind: str, keys, base: str | None, allow_pickle: bool) -> Path:
    """The local diffusers folder a single file's configs (and missing components) come from: `base` (a folder or a
    preset), else the family's default preset; a hub id only from the local cache. Its family must be the file's."""
    from genkit import families, presets
    from genkit.loader import check_folder

    name = base or family.single_file_base(set(keys))
    what = "checkpoint" if kind == "checkpoint" else "transformer/UNet alone"
    if not name:
        raise GenkitError(f"{path} is a {family.title} {what}; name the diffusers folder or preset its configs and "
                          f"tokenizers come from with {term('base')}", param="base")
    preset = presets.get(name)
    source = preset.location() if preset is not None else name
    folder = Path(source).expanduser()
    if not folder.is_dir():
        folder = _cached(source, name, path, family, what)
    config = check_folder(folder, allow_pickle)
    found = families.detect(config.get("_class_name"), str(folder))
    if found is not family:
        raise GenkitError(f"{path} is a {family.title} {what}, but base {name} is a {found.title} model; pass "
                          f"{term('base')} a {family.title} folder or preset", param="base")
    return folder


def _cached(source: str, name: str, path: Path, family, what: str) -> Path:
    """A hub id's folder in the local cache (configs, tokenizers and weights as downloaded before), never fetched."""
    hint = (f"{path} is a {family.title} {what}, whose configs and tokenizers come from base {name}"
            + (f" ({source})" if source != name else ""))
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise GenkitError(f"{hint}, which is not a preset or a folder; pass {term('base')} a diffusers folder or a "
                          "preset", param="base")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError and its kin)
        raise GenkitError(f"{hint}, which is not on this machine (a hub id loads offline only from the local cache); "
                          f"pass {term('base')} a diffusers folder of that family", param="base") from None


def wanted(name, given=None) -> bool:
    """`name` is meant as a single file: a path with a single-file suffix, or a name in the models folder."""
    if not name:
        return False
    path = Path(name).expanduser()
    if path.suffix in SUFFIXES and path.is_file():
        return True
    return not path.exists() and find(str(name), CHECKPOINTS, models_dir(given)) is not None


def locate(name: str, *, base: str | None = None, allow_pickle: bool = False, models_dir_given=None):
    """(SingleFile, family, preset defaults, preset) when `name` is a single file (a path, a preset whose source is one,
    or a name in the models folder), else None. Reads the header, detects the family, finds the base."""
    from genkit import presets

    preset = presets.get(name)
    defaults = {}
    if preset is not None:
        if Path(preset.location()).suffix not in SUFFIXES:
            return None
        name, base, defaults = preset.location(), base or preset.base, preset.defaults
    path = Path(name).expanduser()
    if not path.is_file():
        path = find(name, CHECKPOINTS, models_dir(models_dir_given))
        if path is None:
            return None
    if path.suffix not in SUFFIXES:
        return None
    keys = read_keys(path, allow_pickle)
    family, kind = detect(path, keys)
    source = SingleFile(str(path))
    source.family, source.kind = family, kind
    source.base = base_folder(path, family, kind, keys, base or os.environ.get("GENKIT_BASE") or None, allow_pickle)
    return source, family, defaults, preset


def load(source: SingleFile, *, dtype, use_safetensors):
    """The diffusers pipeline of a located single file."""
    return source.family.load_single_file(Path(source), source.kind, source.base, dtype=dtype,
                                          use_safetensors=use_safetensors)


def named_lora(path: Path, given=None) -> Path:
    """`path` when it exists, else the LoRA of that name in the models folder's LoRA subfolders (when there is one)."""
    if path.exists():
        return path
    return find(str(path), LORAS, models_dir(given)) or path

