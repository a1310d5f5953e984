"""Bring-your-own-images datasets for LoRA fine-tuning: find, caption, check and load them.

DATA_DIR is walked recursively, in sorted order, so the same folder always gives the same
item list. Images: png, jpg, jpeg, webp, bmp, gif (first frame), tif, tiff, any letter case.
Names starting with "." and `__MACOSX` folders are ignored (macOS leaves `._photo.jpg`
litter that looks like a corrupt image). HEIC, AVIF, PSD, SVG and camera RAW files are
reported as skipped ("convert to PNG or JPEG") rather than silently left out.

Each image's caption comes from the first of these that gives a non-empty one (a caption
that is empty or only whitespace counts as none; whitespace and line breaks inside a
caption collapse to single spaces):

1. a sidecar file beside it with the same stem: `photo.txt`, else `photo.caption` (kohya);
2. its entry in a `metadata.jsonl` (lines `{"file_name": "0001.png", "text": "a caption"}`)
   or `metadata.csv` (columns `file_name`, `text`), the HF imagefolder convention; names are
   relative to the metadata file's folder, and the deepest metadata file naming an image wins;
3. the trigger words of the kohya folder it sits in: a folder directly under DATA_DIR named
   `<repeats>_<trigger words>`, e.g. `10_sks dog` (specific to those images, so it beats 4);
4. `instance_prompt`, DreamBooth style, for everything else.

A kohya folder repeats each of its images `repeats` times in the item list, whatever the
caption's source. Only folders directly under DATA_DIR count, as in kohya's sd-scripts, so a
date-named folder deeper down (`trips/2023_rome`) is not read as 2023 repeats; `check_dataset`
lists every kohya folder it found with its repeats.

`scan_folder` is the pre-flight pass training runs first: every image is opened and decoded
once (JPEGs at reduced scale, which still reads every byte) so that a bad file can never stop
a run halfway. Files that cannot be used are skipped, each with a `SkippedFileWarning` (the
standard `warnings` module, so callers can filter or record them) naming the file, and listed
with their reason in `FolderScan.skipped`: unreadable (corrupt or truncated), too large (over
`PIL.Image.MAX_IMAGE_PIXELS`, where Pillow would warn or refuse), unsupported (format or pixel
mode), or missing (named in metadata but not on disk: skipped, not an error, so one deleted
photo does not block a big dataset). What training cannot start with raises `GenkitError`:
a missing DATA_DIR, malformed metadata, no usable images, images without captions.

An image may have a loss mask beside it: `photo.mask.png` for `photo.jpg` (any image extension), greyscale or
RGB, white where the loss counts, black where it is ignored, grey in between; it must have its image's shape (any
size: it is scaled onto the image). The trainer crops it with the image and applies it to the loss in latent
space (genkit.train.lora). A mask file is never an image of its own; one beside no image is listed as unused.
An image whose mask is unreadable or of another shape is skipped, with the reason. `photo.control.png` is a ready
control map for `genkit train controlnet` (genkit.train.controlnet), never an image of its own either.

`genkit.data.decode.load_image` turns an item into the upright training image (a square, or an aspect-ratio
bucket's size: genkit.data.buckets); `fingerprint` names the dataset's content for recording beside the weights;
`check_dataset` and `format_report` show what training would see, buckets and masks included
(`genkit data check DATA_DIR`).
"""

from __future__ import annotations

import csv
import enum
import hashlib
import json
import os
import re
import statistics
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from genkit.data.buckets import Bucket, BucketSpec, cropped_share
from genkit.data.decode import ImageInfo, Skipped, SkipKind, inspect_image
from genkit.errors import GenkitError, term

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UNSUPPORTED_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".dng", ".cr2", ".nef", ".arw")
CAPTION_EXTENSIONS = (".txt", ".caption")  # in order of precedence
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
MASK_SUFFIX = ".mask.png"  # photo.mask.png beside photo.jpg: its loss mask (white: trained, black: ignored)
CONTROL_SUFFIX = ".control.png"  # photo.control.png beside photo.jpg: its control map (genkit train controlnet)
KOHYA_FOLDER = re.compile(r"^([0-9]+)_(.+)$")  # "10_sks dog" -> repeats 10, trigger words "sks dog"
LIST_LIMIT = 20  # files listed per section of format_report


class CaptionSource(enum.Enum):
    SIDECAR = "sidecar"
    METADATA = "metadata"
    FOLDER = "folder name"
    INSTANCE_PROMPT = "instance prompt"
    PRIOR = "prior image"  # made by the trainer (genkit.train.priors), not found in the folder


class SmallImageWarning(UserWarning):
    """Training images far smaller than the training size: upscaled, they teach blur."""


def warn_small_images(items, resolution: int, factor: int = 4) -> list[Path]:
    """Warn once about the images whose shorter side is under `resolution / factor`; returns them."""
    from PIL import Image

    small = []
    for path in dict.fromkeys(item.path for item in items):
        try:
            with Image.open(path) as image:
                side = min(image.size)
        except OSError:
            continue  # unreadable files are the pre-flight check's to report
        if side * factor < resolution:
            small.append((side, path))
    if small:
        side, path = min(small)
        warnings.warn(SmallImageWarning(
            f"{len(small)} training image(s) under a quarter of the training size {resolution} px, smallest {path.name} "
            f"({side} px): upscaled, they teach blur (remove them or lower data.resolution)"), stacklevel=2)
    return [path for _, path in sorted(small)]


class SkippedFileWarning(UserWarning):
    """A file in DATA_DIR that training will leave out; the message names it and says why."""


@dataclass(frozen=True)
class Item:
    path: Path  # absolute path of the image
    caption: str
    source: CaptionSource
    mask: Path | None = None  # its loss mask (NAME.mask.png), if any
    size: tuple[int, int] | None = None  # (width, height) upright, as the pre-flight scan read it


@dataclass
class FolderScan:
    data_dir: Path
    items: list[Item]  # what one epoch iterates, kohya repeats expanded
    images: int  # distinct usable images
    skipped: list[Skipped]

    @property
    def masks(self) -> int:
        """Distinct usable images with a loss mask."""
        return len({item.path for item in self.items if item.mask is not None})


@dataclass(frozen=True)
class _Found:
    """One image file and what discovery learned about it, before it is opened."""

    path: Path
    caption: str | None
    source: CaptionSource | None
    repeats: int
    mask: Path | None = None


# --- Discovery --------------------------------------------------------------------------


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _walk(data_dir: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not _ignored(d))
        files.extend(Path(root, name) for name in names if not _ignored(name))
    return sorted(files, key=lambda p: p.relative_to(data_dir).as_posix())


def _clean(text: str | None) -> str | None:
    """Whitespace collapsed to single spaces; None for an empty caption."""
    if text is None:
        return None
    return " ".join(text.split()) or None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: Windows editors add a BOM
    except UnicodeDecodeError:
        raise GenkitError(f"{path} is not UTF-8 text (save it with UTF-8 encoding)") from None


def _read_metadata(meta: Path) -> list[tuple[int, str, str]]:
    """(line number, file_name, text) for each entry of a metadata.jsonl or metadata.csv."""
    text = _read_text(meta)
    if meta.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = reader.fieldnames or []
        if "file_name" not in columns or "text" not in columns:
            raise GenkitError(f"{meta} needs the columns file_name and text, found {', '.join(columns) or 'none'}")
        return [(reader.line_num, row["file_name"] or "", row["text"] or "") for row in reader]
    entries = []
    example = '{"file_name": "0001.png", "text": "a caption"}'
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = f"is not valid JSON ({exc.msg}); write lines like {example}"
            raise GenkitError(f"{meta} line {number} {reason}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise GenkitError(f"{meta} line {number} has no file_name string; write lines like {example}")
        if not isinstance(entry.get("text"), str):
            raise GenkitError(f"{meta} line {number} has no text string; write lines like {example}")
        entries.append((number, entry["file_name"], entry["text"]))
    return entries


def _metadata_captions(data_dir: Path, files: list[Path], images: set[Path]) -> tuple[dict, list[Skipped]]:
    """Captions named by every metadata file under data_dir, and the entries naming no usable image."""
    metas = [f for f in files if f.name in METADATA_NAMES]
    folders = [m.parent for m in metas]
    for folder in folders:
        if folders.count(folder) > 1:
            raise GenkitError(f"{folder} holds both metadata.jsonl and metadata.csv (keep one)")
    captions, skipped = {}, []
    for meta in sorted(metas, key=lambda m: len(m.parts)):  # deeper files override shallower ones
        seen = {}
        for number, name, text in _read_metadata(meta):
            path = Path(os.path.normpath(meta.parent / name))
            where = f"{meta.relative_to(data_dir)} line {number}"
            if path in seen:
                raise GenkitError(f"{where} names {name!r} again (first at line {seen[path]}); keep one entry")
            seen[path] = number
            if path in images:
                captions[path] = text
            elif path.exists():
                detail = f"named in {where} but not an image inside DATA_DIR"
                skipped.append(Skipped(path, SkipKind.UNSUPPORTED, detail))
            else:
                skipped.append(Skipped(path, SkipKind.MISSING, f"named in {where} but not found"))
    return captions, skipped


def _kohya_folder(data_dir: Path, path: Path) -> tuple[int, str | None]:
    """(repeats, trigger words) from the folder directly under data_dir holding path."""
    parts = path.relative_to(data_dir).parts
    match = KOHYA_FOLDER.match(parts[0]) if len(parts) > 1 else None
    if match is None:
        return 1, None
    repeats = int(match[1])
    if repeats < 1:
        raise GenkitError(f"kohya folder {parts[0]!r} repeats its images {repeats} times (use 1 or more)")
    return repeats, _clean(match[2])


def _is_mask(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def _masks(files: list[Path]) -> dict[Path, Path]:
    """folder/stem -> folder/stem.mask.png, for every mask file."""
    return {f.with_name(f.name[:-len(MASK_SUFFIX)]): f for f in files if _is_mask(f)}


def _discover(data_dir: Path, instance_prompt: str | None) -> tuple[list[_Found], list[Skipped], list[Path]]:
    """Every image with its caption (or None) and mask, skipped entries, and caption and mask files with no image."""
    files = _walk(data_dir)
    masks = _masks(files)
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS and not _is_mask(f)
              and not f.name.lower().endswith(CONTROL_SUFFIX)]
    skipped = [
        Skipped(f, SkipKind.UNSUPPORTED, f"{f.suffix} files are not supported; convert to PNG or JPEG")
        for f in files
        if f.suffix.lower() in UNSUPPORTED_EXTENSIONS
    ]
    from_metadata, missing = _metadata_captions(data_dir, files, set(images))
    file_set, used = set(files), set()
    instance_prompt = _clean(instance_prompt)
    found = []
    for path in images:
        sidecars = [s for s in (path.with_suffix(ext) for ext in CAPTION_EXTENSIONS) if s in file_set]
        used.update(sidecars)
        repeats, trigger = _kohya_folder(data_dir, path)
        candidates = [(_clean(_read_text(s)), CaptionSource.SIDECAR) for s in sidecars]
        candidates += [
            (_clean(from_metadata.get(path)), CaptionSource.METADATA),
            (trigger, CaptionSource.FOLDER),
            (instance_prompt, CaptionSource.INSTANCE_PROMPT),
        ]
        caption, source = next(((c, s) for c, s in candidates if c), (None, None))
        mask = masks.get(path.with_suffix(""))
        used.update([mask] if mask else [])
        found.append(_Found(path, caption, source, repeats, mask))
    unused = [f for f in files if (f.suffix.lower() in CAPTION_EXTENSIONS or _is_mask(f)) and f not in used]
    return found, skipped + missing, unused


# --- Pre-flight and the dataset ---------------------------------------------------------


def _preflight(data_dir: str | Path, instance_prompt: str | None):
    """(data_dir, found images, their inspection results, skipped entries, unused caption files)."""
    folder = Path(os.path.abspath(data_dir))
    if not folder.exists():
        raise GenkitError(f"DATA_DIR {data_dir} does not exist (pass a folder of images)")
    if not folder.is_dir():
        raise GenkitError(f"DATA_DIR {data_dir} is not a folder (pass the folder that holds the images)")
    found, skipped, unused = _discover(folder, instance_prompt)
    results = [_with_mask(f, inspect_image(f.path)) for f in found]
    skipped += [r for r in results if isinstance(r, Skipped)]
    return folder, found, results, skipped, unused


def _with_mask(found: _Found, result: ImageInfo | Skipped) -> ImageInfo | Skipped:
    """The image's inspection, or why its mask makes it unusable: unreadable, or not the image's shape."""
    if found.mask is None or isinstance(result, Skipped):
        return result
    mask = inspect_image(found.mask)
    if isinstance(mask, Skipped):
        return Skipped(found.path, mask.kind, f"its mask {found.mask.name} is {mask.kind.value}: {mask.detail}")
    if abs(mask.width * result.height - mask.height * result.width) > result.width + result.height:  # not rounding
        return Skipped(found.path, SkipKind.UNSUPPORTED, f"its mask {found.mask.name} is {mask.width}x{mask.height} "
                       f"and the image {result.width}x{result.height}; a mask must have its image's shape")
    return result


def _kinds(skipped: list[Skipped]) -> str:
    """"2 unreadable, 1 too large"."""
    return ", ".join(f"{n} {kind}" for kind, n in Counter(s.kind.value for s in skipped).items())


def _problems(folder: Path, usable: list[_Found], skipped: list[Skipped]) -> list[str]:
    """What stops training from starting, as one-line messages."""
    if not usable:
        if skipped:
            return [f"no usable images in {folder}: {len(skipped)} skipped ({_kinds(skipped)}); fix or remove them"]
        return [f"no images in {folder} (looked for {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}, in subfolders too)"]
    missing = [f.path for f in usable if f.caption is None]
    if missing:
        return [
            f"{len(missing)} of {len(usable)} images have no caption (first: {missing[0]}); "
            f'pass {term("instance_prompt")} "a photo of sks dog" or add sidecar .txt files'
        ]
    return []


def scan_folder(data_dir: str | Path, *, instance_prompt: str | None = None) -> FolderScan:
    """Find, caption and check every image under data_dir; what training will iterate.

    Skipped files are warned about (SkippedFileWarning) and listed; raises GenkitError when
    training could not start (see the module docstring for the rules).
    """
    folder, found, results, skipped, _ = _preflight(data_dir, instance_prompt)
    for entry in skipped:
        warnings.warn(f"skipping {entry}", SkippedFileWarning, stacklevel=2)
    usable = [f for f, r in zip(found, results) if isinstance(r, ImageInfo)]
    if problems := _problems(folder, usable, skipped):
        raise GenkitError(problems[0])
    info = {f.path: r for f, r in zip(found, results) if isinstance(r, ImageInfo)}
    items = [Item(f.path, f.caption, f.source, f.mask, (info[f.path].width, info[f.path].height))
             for f in usable for _ in range(f.repeats)]
    return FolderScan(folder, items, len(usable), skipped)


def _file_digest(path: Path) -> str:
    from genkit.files import file_sha256

    return file_sha256(path)


def fingerprint(items) -> str:
    """16 hex digits naming the dataset's content: each item's file bytes and caption (and its mask's bytes).

    Paths and order do not count, so a moved or renamed folder keeps its fingerprint;
    repeats do (an image repeated 10 times is a different dataset from one seen once).
    """
    digests = {}
    entries = []
    for item in items:
        for path in (item.path, item.mask):
            if path is not None and path not in digests:
                digests[path] = _file_digest(path)
        entries.append([digests[item.path], item.caption] + ([digests[item.mask]] if item.mask else []))
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]


# --- Checking a dataset -----------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    min: float
    mean: float
    max: float

    @classmethod
    def of(cls, values) -> Stats | None:
        values = list(values)
        return cls(min(values), statistics.fmean(values), max(values)) if values else None


@dataclass(frozen=True)
class BucketRow:
    resolution: int  # the training size the bucket belongs to
    bucket: Bucket
    images: int  # distinct usable images in it
    cropped: float  # mean share of their pixels the crop cuts away


def bucket_rows(spec: BucketSpec, sizes: list[tuple[int, int]]) -> list[BucketRow]:
    """Each bucket of `spec` the images (width, height) fill, per training size, in the order the trainer uses."""
    plan = spec.plan(sizes)
    rows = []
    for resolution in spec.resolutions:
        inside = set(spec.buckets(resolution))
        for index, bucket in sorted(enumerate(plan.buckets), key=lambda pair: pair[1].ratio):  # tall to wide
            if bucket in inside:
                shares = [cropped_share(*sizes[i], bucket) for i, b in plan.entries if b == index]
                rows.append(BucketRow(resolution, bucket, len(shares), statistics.fmean(shares)))
    return rows


@dataclass
class DatasetReport:
    data_dir: Path
    images: int  # distinct usable images
    items: int  # what one epoch iterates, kohya repeats expanded
    skipped: list[Skipped]
    caption_sources: dict[str, int]  # CaptionSource value -> usable images captioned from it
    missing_captions: list[Path]  # usable images with no caption
    repeats: dict[str, int]  # kohya folder -> repeats, for folders holding usable images
    caption_words: Stats | None
    caption_tokens: Stats | None  # with the tokenizer's special tokens; None without a tokenizer
    max_tokens: int | None  # the text encoder's limit the captions were checked against
    too_long: list[tuple[Path, int]]  # (image, tokens) for captions over max_tokens
    width: Stats | None  # pixels, after EXIF orientation
    height: Stats | None
    modes: dict[str, int]  # Pillow mode as stored -> images
    unused_captions: list[Path]  # .txt/.caption files beside no image
    fingerprint: str | None  # None while there are problems
    problems: list[str] = field(default_factory=list)  # what stops training from starting
    masks: int = 0  # usable images with a loss mask (NAME.mask.png)
    unused_masks: list[Path] = field(default_factory=list)  # NAME.mask.png files beside no image
    buckets: list[BucketRow] = field(default_factory=list)  # where the images train, with a BucketSpec
    bucket_note: str = ""  # why there are no buckets to show, when a caller knows

    @property
    def ok(self) -> bool:
        return not self.problems


def count_tokens(caption: str, tokenizer) -> int:
    """Tokens a Hugging Face tokenizer gives the caption, special tokens included, uncut."""
    return len(tokenizer(caption, truncation=False, verbose=False)["input_ids"])


def _token_limit(tokenizer, max_tokens: int | None) -> int | None:
    if max_tokens is not None:
        if max_tokens < 1:
            raise GenkitError(f"max_tokens must be at least 1, got {max_tokens}")
        return max_tokens
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None  # HF uses a huge sentinel for "unknown"


def check_dataset(
    data_dir: str | Path,
    *,
    instance_prompt: str | None = None,
    tokenizer=None,
    max_tokens: int | None = None,
    buckets: BucketSpec | None = None,
) -> DatasetReport:
    """What training would see in data_dir, without raising for problems it can list.

    Raises GenkitError only for what stops the check itself: a missing DATA_DIR or malformed
    metadata. With a tokenizer, captions over max_tokens (default: the tokenizer's
    model_max_length) are listed, since the text encoder would cut them. With a BucketSpec, the
    aspect-ratio buckets the images fill are listed.
    """
    folder, found, results, skipped, unused = _preflight(data_dir, instance_prompt)
    usable = [(f, r) for f, r in zip(found, results) if isinstance(r, ImageInfo)]
    captioned = [f for f, _ in usable if f.caption is not None]
    problems = _problems(folder, [f for f, _ in usable], skipped)
    limit = _token_limit(tokenizer, max_tokens) if tokenizer is not None else max_tokens
    tokens = [(f.path, count_tokens(f.caption, tokenizer)) for f in captioned] if tokenizer is not None else []
    items = [Item(f.path, f.caption, f.source, f.mask) for f in captioned for _ in range(f.repeats)]
    return DatasetReport(
        data_dir=folder,
        images=len(usable),
        items=sum(f.repeats for f, _ in usable),
        skipped=skipped,
        caption_sources=dict(Counter(f.source.value for f in captioned)),
        missing_captions=[f.path for f, _ in usable if f.caption is None],
        repeats={f.path.relative_to(folder).parts[0]: f.repeats for f, _ in usable if f.repeats > 1},
        caption_words=Stats.of(len(f.caption.split()) for f in captioned),
        caption_tokens=Stats.of(n for _, n in tokens),
        max_tokens=limit,
        too_long=[(path, n) for path, n in tokens if limit is not None and n > limit],
        width=Stats.of(r.width for _, r in usable),
        height=Stats.of(r.height for _, r in usable),
        modes=dict(Counter(r.mode for _, r in usable)),
        unused_captions=[p for p in unused if not _is_mask(p)],
        fingerprint=fingerprint(items) if not problems else None,
        problems=problems,
        masks=sum(f.mask is not None for f, _ in usable),
        unused_masks=[p for p in unused if _is_mask(p)],
        buckets=bucket_rows(buckets, [(r.width, r.height) for _, r in usable]) if buckets and usable else [],
    )


def _listing(lines: list[str]) -> list[str]:
    shown = [f"    {line}" for line in lines[:LIST_LIMIT]]
    return shown + ([f"    ... and {len(lines) - LIST_LIMIT} more"] if len(lines) > LIST_LIMIT else [])


def format_report(report: DatasetReport) -> str:
    """The report as aligned text lines for a terminal."""

    def rel(path: Path) -> str:
        return path.relative_to(report.data_dir).as_posix() if path.is_relative_to(report.data_dir) else str(path)

    def stats(s: Stats) -> str:
        return f"min {s.min:g}, mean {s.mean:.1f}, max {s.max:g}"

    lines = [f"data_dir     {report.data_dir}", f"images       {report.images} usable, {report.items} items per epoch"]
    if report.repeats:
        lines.append("repeats      " + ", ".join(f"{folder} x{n}" for folder, n in report.repeats.items()))
    lines.append(f"skipped      {len(report.skipped)}" + (f" ({_kinds(report.skipped)})" if report.skipped else ""))
    lines += _listing([f"{rel(s.path)}: {s.kind.value} ({s.detail})" for s in report.skipped])
    sources = ", ".join(f"{source} {n}" for source, n in report.caption_sources.items()) or "none"
    missing = f", missing {len(report.missing_captions)}" if report.missing_captions else ""
    lines.append(f"captions     {sources}{missing}")
    lines += _listing([f"no caption: {rel(p)}" for p in report.missing_captions])
    if report.caption_words:
        lines.append(f"  words      {stats(report.caption_words)}")
    if report.caption_tokens:
        limit = f" (limit {report.max_tokens})" if report.max_tokens else ""
        lines.append(f"  tokens     {stats(report.caption_tokens)}{limit}")
    if report.too_long:
        lines.append(f"  too long   {len(report.too_long)} over {report.max_tokens} tokens; the text encoder cuts them")
        lines += _listing([f"{rel(p)}: {n} tokens" for p, n in report.too_long])
    if report.unused_captions:
        lines.append(f"  unused     {len(report.unused_captions)} caption files beside no image")
        lines += _listing([rel(p) for p in report.unused_captions])
    lines.append(f"masks        {report.masks} of {report.images} images (white: trained, black: ignored)")
    if report.unused_masks:
        lines.append(f"  unused     {len(report.unused_masks)} mask files beside no image")
        lines += _listing([rel(p) for p in report.unused_masks])
    if report.width and report.height:
        w, h = report.width, report.height
        lines.append(f"sizes        width {w.min:g}..{w.max:g}, height {h.min:g}..{h.max:g}")
    if report.bucket_note and not report.buckets:
        lines.append(f"buckets      - ({report.bucket_note})")
    for resolution in dict.fromkeys(row.resolution for row in report.buckets):
        rows = [row for row in report.buckets if row.resolution == resolution]
        lines.append(f"buckets      {resolution} px: {len(rows)} used (images, mean share cropped)")
        lines += [f"    {str(row.bucket):>11}  {row.bucket.ratio:4.2f}:1  {row.images:>5} images  {row.cropped:6.1%}"
                  for row in rows]
    lines.append("modes        " + (", ".join(f"{m} {n}" for m, n in sorted(report.modes.items())) or "none"))
    lines.append(f"fingerprint  {report.fingerprint or '-'}")
    lines += [f"problem      {p}" for p in report.problems]
    return "\n".join(lines)
