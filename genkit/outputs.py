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

import glob
import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from genkit.errors import GenkitError

MANIFEST = "manifest.jsonl"


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


def read_record(path: str | Path) -> dict:
    """The `genkit` JSON record stored in an image written by genkit."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.text.get("genkit") if hasattr(image, "text") else None
    except (OSError, ValueError) as exc:
        raise GenkitError(f"cannot read {path}: {exc}") from None
    if not text:
        raise GenkitError(f"{path} holds no genkit record (was it written by genkit generate?)")
    return json.loads(text)


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed atomic_write of `path` left behind."""
    for stale in path.parent.glob(f".{glob.escape(path.stem)}-*{glob.escape(path.suffix)}.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename into place: readers never see a partial file."""
    remove_stale_temporaries(path)  # what a kill between the two steps left for this path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path, record: dict) -> None:
    info = PngInfo()
    info.add_text("parameters", infotext(record))
    info.add_text("genkit", json.dumps(record, ensure_ascii=False))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def check_out_dir(out: str | Path) -> Path:
    """Fail before anything is generated when `out` cannot hold the images."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GenkitError(f"--out {out} is a file, not a folder (choose a folder path)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GenkitError(f"--out {out}: {parent} is a file, so the folder cannot be created (choose another path)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GenkitError(f"--out {out}: {parent} is not writable (choose a folder you can write to)")
    return out


class OutputWriter:
    """Writes images and the manifest for one run; knows which images already exist."""

    def __init__(self, out: str | Path, *, overwrite: bool = False):
        self.out = check_out_dir(out)
        self.overwrite = overwrite
        self.records: dict[str, dict] = {}

    def path_for(self, record: dict) -> Path:
        return self.out / image_name(record["index"], record["seed"], record["prompt"])

    def exists(self, record: dict) -> bool:
        """True when this image is already on disk and will be kept (not overwritten)."""
        path = self.path_for(record)
        if self.overwrite or not path.is_file():
            return False
        self.records[path.name] = {**read_record(path), "file": path.name}
        return True

    def write(self, image: Image.Image, record: dict) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.path_for(record)
        save_png(image, path, record)
        self.records[path.name] = {**record, "file": path.name}
        with open(self.out / MANIFEST, "a") as manifest:  # progress record; rewritten whole by close()
            manifest.write(json.dumps(self.records[path.name], ensure_ascii=False) + "\n")
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
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(text))
        return manifest
