"""What a run leaves on disk: PNGs that record how they were made, and manifest.jsonl.

Each PNG carries two text chunks:
- `parameters`: AUTOMATIC1111's infotext (prompt line, `Negative prompt:` line, then
  `Steps: 20, Sampler: DPM++ 2M, CFG scale: 4.0, Seed: 11, Size: 32x32, Model: genkit-mini`),
  which image browsers, Civitai and "PNG Info" tabs read;
- `genkit`: the full JSON record, enough to replay the image exactly (`genkit replay`).

Files appear atomically (written under a temporary name, then renamed), so a killed run
never leaves a half-written image, and a rerun skips the images that already exist. A kill
between the two steps can leave a hidden `.<name>-*.png.tmp`; the rerun that writes that image
removes it (each image has one writer, also across processes).
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from genkit import settings
from genkit.errors import GenkitError, strict_json, term

MANIFEST = "manifest.jsonl"


@functools.lru_cache(maxsize=4096)  # a run of 100,000 images names a few prompts 100,000 times
def slug(text: str, limit: int = 48) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def image_name(index: int, seed: int, prompt: str) -> str:
    return f"{index:05d}-{seed}-{slug(prompt)}.png"


def infotext(record: dict) -> str:
    """AUTOMATIC1111's `parameters` text for one image record."""
    from genkit import schedulers

    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    sampler = record["scheduler"]
    try:
        sampler = schedulers.a1111_name(sampler)
    except GenkitError:
        pass
    fields = {
        "Steps": record["num_inference_steps"],
        "Sampler": sampler,
        "CFG scale": record["guidance_scale"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"],
    }
    if record.get("hires_scale") is not None:  # the hires fix (genkit.hires), as A1111's txt2img writes it
        upscaler = record.get("hires_upscaler", "latent")
        fields["Denoising strength"] = record.get("hires_strength")
        fields["Hires upscale"] = f"{record['hires_scale']:g}"
        if record.get("hires_steps"):
            fields["Hires steps"] = record["hires_steps"]
        fields["Hires upscaler"] = {"latent": "Latent", "lanczos": "Lanczos"}.get(upscaler, Path(upscaler).stem)
    if record.get("strength") is not None:  # an edit, as A1111's img2img tab writes it (an instruction edit has none)
        fields["Denoising strength"] = record["strength"]
        if record.get("mask") is not None or record.get("outpaint"):
            fields["Mask blur"] = 0  # genkit's masks are hard (binarised); the known region is the input's pixels
    if record.get("lora"):
        fields["Lora"] = '"' + ", ".join(f"{lo['name']}: {lo['scale']}" for lo in record["lora"]) + '"'
    fields["Version"] = f"genkit {record.get('versions', {}).get('genkit', '?')}"
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict:
    """Read A1111 infotext back into prompt, negative prompt and its `Key: value` fields."""
    lines = text.split("\n")
    *head, last = lines
    prompt_lines, negative = [], ""
    for i, line in enumerate(head):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line[len("Negative prompt:"):].strip(), *head[i + 1:]])
            break
        prompt_lines.append(line)
    fields = {}
    for match in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', last):
        fields[match.group(1).strip()] = match.group(2).strip()
    return {"prompt": "\n".join(prompt_lines), "negative_prompt": negative, **fields}


@dataclass(frozen=True)
class RecordKey:
    """One key of an image's record (the `genkit` PNG chunk, a manifest.jsonl line)."""

    name: str
    kind: str  # "setting" (genkit.settings), "digest" (an input's sha256), "run" (what replay loads, how the prompt
    # was read), "environment" (what changes floating-point results, not what was asked), "output" (the file)
    required: tuple[type, ...] | None = None  # replay needs it, of these types (ranges checked as for a new run)
    label: str | None = None  # how replay names it when this run's differs (an environment key)


def _settings_keys() -> tuple[RecordKey, ...]:
    keys = []
    for setting in settings.SETTINGS:
        if setting.recorded:
            keys.append(RecordKey(setting.name, "setting", None if setting.edit or setting.optional else setting.json))
        if setting.digest:
            keys.append(RecordKey(settings.digest_key(setting.name), "digest"))
    return tuple(keys)


# The record's schema: every key genkit writes in an image's record. Pipeline.record writes them (the settings from
# genkit.settings, the rest from the pipeline), the writer adds `file` (and a run `skipped`); replay reads the
# settings back as the image's Job, the digests to check its inputs, the run keys as what to load, and names the
# environment keys that differ; a prompts file reads settings and digests and leaves the rest to the command line.
RECORD = (
    RecordKey("index", "run", (int,)),
    *_settings_keys(),
    RecordKey("model", "run", (str,)),
    RecordKey("family", "run"),
    RecordKey("lora", "run", (list,)),
    RecordKey("threads", "environment", label="CPU threads"),
    RecordKey("device", "environment", label="device"),
    RecordKey("dtype", "environment", label="dtype"),
    RecordKey("compiled", "environment", label="--compile"),
    RecordKey("exact", "environment", label="--exact/--fast"),
    RecordKey("attention", "environment", label="attention backend"),
    RecordKey("versions", "environment", label="library versions"),
    RecordKey("vae_upcast", "environment", label="VAE decoded in fp32"),  # its half-precision pixels were NaN
    RecordKey("quantization", "environment", label="quantized weights"),  # {component: kind} (genkit.quantize)
    RecordKey("memory_plan", "environment", label="memory plan"),  # placement, VAE mode, batch cap (genkit.memory)
    RecordKey("prompt_truncated", "run"),  # what the text encoder dropped (a CLIP family's cut)
    RecordKey("prompt_chunks", "run"),  # the pieces a long prompt was read in
    RecordKey("prompt_unknown_words", "run"),  # words the model was never taught (genkit-mini)
    RecordKey("file", "output"),
    RecordKey("skipped", "output"),
)
RECORD_SETTINGS = tuple(key.name for key in RECORD if key.kind == "setting")  # replay's Job, a prompts file's line
RECORD_ONLY = frozenset(key.name for key in RECORD if key.kind not in ("setting", "digest"))  # left to the command line
ENVIRONMENT = {key.name: key.label for key in RECORD if key.label}  # replay's reasons, when pixels differ
_REQUIRED = {key.name: key.required for key in RECORD if key.required}


def read_record(path: str | Path) -> dict:
    """The `genkit` JSON record stored in an image written by genkit, checked like a new run's settings."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.text.get("genkit") if hasattr(image, "text") else None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for some broken PNG chunks
        raise GenkitError(f"cannot read {path}: {exc}") from None
    if not text:
        raise GenkitError(f"{path} holds no genkit record (was it written by genkit generate?)")
    try:
        record = strict_json(text)
    except (ValueError, RecursionError) as exc:
        raise GenkitError(f"{path}: its genkit record is not valid JSON ({getattr(exc, 'msg', exc)}); the image was "
                          "edited or damaged, so it cannot be replayed") from None
    check_record(record, path)
    return record


def check_record(record, path) -> None:
    """A GenkitError naming the field when a stored record cannot be replayed as it is."""
    from genkit import checks

    where = f"{path}: genkit record"
    if not isinstance(record, dict):
        raise GenkitError(f"{where} is a JSON {type(record).__name__}, not an object; the image was edited or "
                          "damaged, so it cannot be replayed")
    for key, kind in _REQUIRED.items():
        if key not in record:
            raise GenkitError(f"{where} has no {key!r}; the image was edited or damaged, so it cannot be replayed")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise GenkitError(f"{where}: {key} has the wrong type ({value!r:.60}); the image was edited or damaged")
    checks.check_count(record["index"] + 1, "index", f"{where}: index + 1")
    if not record["prompt"].strip():
        raise GenkitError(f"{where}: prompt is empty; the image was edited or damaged")
    checks.check_seed(record["seed"], f"{where}: seed")
    checks.check_steps(record["num_inference_steps"], f"{where}: num_inference_steps")
    checks.check_guidance(record["guidance_scale"], f"{where}: guidance_scale")
    for key in ("width", "height"):
        checks.check_side(record[key], key, f"{where}: {key}")
    for number, entry in enumerate(record["lora"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or \
                isinstance(entry.get("scale"), bool) or not isinstance(entry.get("scale"), (int, float)):
            raise GenkitError(f'{where}: lora[{number}] needs a "path" string and a "scale" number; the image was '
                              "edited or damaged")


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed atomic_write or atomic_folder of `path` left behind."""
    import shutil

    for stale in path.parent.glob(f".{glob.escape(path.stem)}-*{glob.escape(path.suffix)}.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """The one way genkit writes a file: call `write(tmp_path)`, then rename into place, so readers never see a
    partial file (a kill or an error inside `write` leaves the file as it was, or absent). Every writer goes through
    here or `atomic_folder` (tests/test_atomic.py keeps it so); a library that writes files itself writes to the
    temporary path it is handed.

    The temporary file is created with mode 0666 less the umask, as `open()` creates files (tempfile's 0600
    would make every result unreadable to other users and web servers). A full disk (or quota, or a read-only
    file system) is a GenkitError and leaves no partial file.
    """
    _replace_with(path, write, folder=False)


def atomic_folder(folder: Path, write) -> None:
    """`atomic_write` for a folder: call `write(tmp_folder)` on a new, empty folder beside `folder`, then put it in
    place with `genkit.files.replace_folder` (a complete copy at `folder` at every moment); a kill or an error inside
    `write` leaves the old folder (or none), never a partial one."""
    _replace_with(Path(folder), write, folder=True)


def _replace_with(path: Path, write, *, folder: bool) -> None:
    import shutil

    from genkit.files import replace_folder

    path = Path(path)
    remove_stale_temporaries(path)  # what a kill between the two steps left for this path
    tmp = None
    try:
        tmp = _create_temporary(path, folder)
        write(tmp)
        replace_folder(tmp, path) if folder else os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if folder else Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            raise GenkitError(f"cannot write {path}: {exc.strerror} (free some space or choose another {term('out')}; "
                              "files written before are complete and a rerun keeps them)") from None
        raise


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _create_temporary(path: Path, folder: bool = False) -> Path:
    """A new, empty, hidden file (or folder) beside `path`, created with os.open's (os.mkdir's) default mode so the
    umask applies."""
    for _ in range(100):
        name = path.parent / f".{path.stem}-{secrets.token_hex(4)}{path.suffix}.tmp"
        try:
            if folder:
                os.mkdir(name)
            else:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


# zlib's level 1, not Pillow's 6: on a photo-like 512x512 image 25 ms instead of 89 (1024x1024: 122 instead of 342) for
# a file 16% larger; the same pixels. That time is a served request's, and a GPU waits for it (docs/benchmarks.md,
# "Where the time around the denoiser goes").
PNG_COMPRESS_LEVEL = 1


def save_png(image: Image.Image, path: Path, record: dict | None = None) -> None:
    """Write `image` as a PNG through `atomic_write`; with a record, carrying its `parameters` and `genkit` chunks."""
    info = None
    if record is not None:
        info = PngInfo()
        info.add_text("parameters", infotext(record))
        info.add_text("genkit", json.dumps(record, ensure_ascii=False))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL))


def save_text(path: Path, text: str) -> None:
    """Write a text file (a record, a report, a manifest) through `atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_out_dir(out: str | Path) -> Path:
    """Fail before anything is generated when `out` cannot hold the images; creates nothing.

    `a/../b` is taken as `b` (creating it would otherwise leave an empty `a/`). Writability is tried by
    making (and removing) a temporary folder in the nearest existing parent, so /proc, read-only mounts
    and folders of other users fail here, before the model loads.
    """
    out = Path(os.path.normpath(Path(out).expanduser()))
    if out.exists() and not out.is_dir():
        raise GenkitError(f"{out} is a file, not a folder (choose a folder path)", param="out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GenkitError(f"{out}: {parent} is a file, so the folder cannot be created (choose another path)",
                          param="out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GenkitError(f"{out}: {parent} is not writable (choose a folder you can write to)", param="out")
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".genkit-probe-").cleanup()
    except OSError as exc:
        raise GenkitError(f"{out}: cannot create files in {parent} ({exc.strerror or exc}); choose a folder "
                          "you can write to", param="out") from None
    return out


RUN_SEEDS = ".genkit-seeds.json"  # {run key: base seed} of the runs in a folder that drew their seed
_NOT_THE_RUN = ("seed", "out", "overwrite", "grid", "progress")  # request fields that do not change which images


def run_key(request) -> str:
    """What makes two `genkit generate` requests the same run (prompts, settings, model; not the seed or output
    flags): a sha256 of their fields as JSON."""
    import dataclasses
    import hashlib

    fields = {k: v for k, v in dataclasses.asdict(request).items() if k not in _NOT_THE_RUN}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_seeds(out: Path) -> dict:
    try:
        seeds = json.loads((out / RUN_SEEDS).read_text())
    except (OSError, ValueError):
        return {}
    return seeds if isinstance(seeds, dict) else {}


def recorded_seed(out: str | Path, key: str) -> int | None:
    """The base seed an earlier run with this key drew in `out` (to finish it after a crash), or None."""
    from genkit.checks import MAX_SEED

    seed = _read_seeds(Path(out)).get(key)
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED else None


def record_seed(out: str | Path, key: str, seed: int) -> None:
    """Remember that the run `key` in `out` drew base seed `seed` (written once its first image is)."""
    out = Path(out)
    seeds = {**_read_seeds(out), key: seed}
    save_text(out / RUN_SEEDS, json.dumps(seeds, indent=1) + "\n")


class OutputWriter:
    """Writes images and the manifest for one run; knows which images already exist.

    `run_seed=(run_key(request), seed)` for a run whose base seed was drawn, not given: it is recorded in the
    folder with the first image, so rerunning the same command there finishes the run (`recorded_seed`).
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False, run_seed: tuple[str, int] | None = None):
        self.out = check_out_dir(out)
        self.overwrite = overwrite
        self.records: dict[str, dict] = {}
        self.run_seed = run_seed
        self._names: set[str] | None = None  # the folder's file names, listed once by has()

    def path_for(self, record: dict) -> Path:
        return self.out / image_name(record["index"], record["seed"], record["prompt"])

    def exists(self, record: dict) -> bool:
        """True when this image is already on disk and will be kept (not overwritten)."""
        return self.has(record["index"], record["seed"], record["prompt"])

    def has(self, index: int, seed: int, prompt: str) -> bool:
        """`exists` from the three fields that name the file, so a caller need not build a record per job: the
        folder is listed once (100,000 is_file calls took longer than the first image)."""
        name = image_name(index, seed, prompt)
        if self.overwrite or name not in self._listing():
            return False
        self.records[name] = {**read_record(self.out / name), "file": name}
        return True

    def _listing(self) -> set[str]:
        if self._names is None:
            try:
                self._names = {entry.name for entry in os.scandir(self.out) if entry.is_file()}
            except FileNotFoundError:
                self._names = set()
        return self._names

    def write(self, image: Image.Image, record: dict) -> Path:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GenkitError(f"cannot create {self.out}: {exc.strerror or exc} (free some space or choose another "
                              f"{term('out')})") from None
        path = self.path_for(record)
        save_png(image, path, record)
        if self._names is not None:
            self._names.add(path.name)
        if self.run_seed is not None:
            record_seed(self.out, *self.run_seed)
            self.run_seed = None
        self.records[path.name] = {**record, "file": path.name}
        try:
            with open(self.out / MANIFEST, "a") as manifest:  # progress record; rewritten whole by close()
                manifest.write(json.dumps(self.records[path.name], ensure_ascii=False) + "\n")
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                raise
            raise GenkitError(f"cannot write {self.out / MANIFEST}: {exc.strerror} (free some space or choose "
                              f"another {term('out')}; close() rewrites the manifest whole)") from None
        return path

    def close(self) -> Path | None:
        """Rewrite manifest.jsonl: one line per image of this run (and earlier runs), in index order."""
        manifest = self.out / MANIFEST
        if not self.records and not manifest.is_file():
            return None
        old = {}
        if manifest.is_file():
            for line in manifest.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    old[entry["file"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        merged = {**old, **self.records}
        lines = sorted(merged.values(), key=lambda r: (r.get("index", 0), r["file"]))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
        save_text(manifest, text)
        return manifest
