"""Where served images go: the CLI's files and manifest, and a list of recent ones.

Images are written by `genkit.outputs.OutputWriter`, as `genkit generate` writes them: a PNG
named `<index>-<seed>-<prompt-slug>.png` with A1111's `parameters` chunk and the `genkit` JSON
record, plus a line in `manifest.jsonl`; so `genkit replay` remakes any served image. Indices
continue after the highest already in the folder. Without an `out` folder the images live in a
private temporary folder for as long as the server runs.

An edit's input image and mask are kept beside its images as `input-<sha>.png` and
`mask-<sha>.png` (named by their content, so a request repeated with the same input writes
nothing new); the record names that file, so `genkit replay IMAGE` finds it. Without an output
folder nothing is kept: the record says "<PIL image>" and replay needs `--image`.

File names are generated here, never taken from a request: a name from a URL is only looked up
against the strict pattern of names this module makes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from genkit.outputs import MANIFEST, OutputWriter

NAME = re.compile(r"^\d{5,}-\d+-[a-z0-9-]+\.png$")
INPUT_NAME = re.compile(r"^(input|mask)-[0-9a-f]{16}\.png$")
COMPACT_EVERY = 1000  # rewrite the manifest and forget the writer's records this often (bounded memory)


@dataclass(frozen=True)
class Entry:
    file: str
    record: dict
    time: float


class ImageStore:
    def __init__(self, out: str | Path | None = None, *, keep: int = 2000):
        self.temporary = out is None
        self.out = Path(tempfile.mkdtemp(prefix="genkit-serve-")) if out is None else Path(out)
        self.writer = OutputWriter(self.out)
        self.recent: deque[Entry] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._next_index = 0
        self._written = 0
        self._load_manifest()

    def _load_manifest(self) -> None:
        manifest = self.out / MANIFEST
        if not manifest.is_file():
            return
        entries = []
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                path = self.out / record["file"]
                self._next_index = max(self._next_index, int(record["index"]) + 1)
                if path.is_file():
                    entries.append(Entry(record["file"], {k: v for k, v in record.items() if k != "file"},
                                         path.stat().st_mtime))
            except (ValueError, KeyError, TypeError, OSError):
                continue
        self.recent.extend(sorted(entries, key=lambda e: e.time))

    def next_index(self) -> int:
        with self._lock:
            index, self._next_index = self._next_index, self._next_index + 1
            return index

    def save(self, image, record: dict) -> Entry:
        """Write one image and its manifest line (the queue's delivery thread calls this, one image at a time)."""
        path = self.writer.write(image, record)
        entry = Entry(path.name, record, time.time())
        with self._lock:
            self.recent.append(entry)
            self._written += 1
            if self._written % COMPACT_EVERY == 0:
                self.writer.close()
                self.writer.records.clear()
        return entry

    @property
    def keeps_inputs(self) -> bool:
        return not self.temporary

    @staticmethod
    def input_picture(picture, kind: str):
        """(the Picture as read from its kept file, the file's name, its PNG bytes) for an input of `kind` ("input"
        or "mask"): the same pixels, as the engine reads them back from the file, hashed as a file."""
        import hashlib
        from io import BytesIO

        from genkit.edit import Picture

        buffer = BytesIO()
        picture.pixels.save(buffer, format="PNG")
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        name = f"{kind}-{digest[:16]}.png"
        return Picture(name, digest, picture.pixels), name, data

    def keep_input(self, name: str, data: bytes) -> None:
        """Write an input file once (worker thread; a file of that name already holds these bytes)."""
        from genkit.outputs import atomic_write

        if not INPUT_NAME.match(name):
            raise ValueError(f"not an input file name: {name!r}")
        path = self.out / name
        if not path.is_file():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))

    def input_path(self, name: str) -> Path | None:
        """A kept input's file, by the name a record holds."""
        if not isinstance(name, str) or not INPUT_NAME.match(name):
            return None
        path = self.out / name
        return path if path.is_file() else None

    def path(self, name: str) -> Path | None:
        if not NAME.match(name):
            return None
        path = self.out / name
        return path if path.is_file() else None

    def find(self, name: str) -> Entry | None:
        with self._lock:
            return next((entry for entry in reversed(self.recent) if entry.file == name), None)

    def newest(self, limit: int, query: str = "") -> list[Entry]:
        words = query.lower().split()
        with self._lock:
            entries = list(reversed(self.recent))
        if words:
            entries = [e for e in entries if all(w in search_text(e) for w in words)]
        return entries[:limit]

    def close(self) -> None:
        with self._lock:
            self.writer.close()
        if self.temporary:
            shutil.rmtree(self.out, ignore_errors=True)


def search_text(entry: Entry) -> str:
    record = entry.record
    loras = " ".join(lo.get("name", "") for lo in record.get("lora", []))
    return " ".join(str(x) for x in (record.get("prompt"), record.get("negative_prompt"), record.get("seed"),
                                     record.get("model"), record.get("scheduler"), loras, entry.file)).lower()
