"""The LoRAs a server offers, by name, from the folders given at startup (--lora-dir).

A request names LoRAs with A1111's prompt tag `<lora:name:weight>` or a structured `loras`
field; names resolve only against this list, never to a path the request chose. A folder's
`*.safetensors` files are LoRAs named by their stem, and each subfolder holding a
`.safetensors` file (genkit's own output, `pytorch_lora_weights.safetensors`) one named by the
subfolder.
"""

from __future__ import annotations

import re
from pathlib import Path

from genkit.errors import GenkitError
from genkit.serve.errors import ApiError

TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>", re.IGNORECASE)


class LoraLibrary:
    def __init__(self, folders=()):
        self.folders = [Path(folder) for folder in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise GenkitError(f"{folder} is not a folder", param="lora_dir")
        self.paths: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        """Scan the folders again (A1111's refresh-loras)."""
        paths: dict[str, Path] = {}
        for folder in self.folders:
            for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
                name = entry.stem if entry.is_file() else entry.name
                if entry.is_file() and entry.suffix == ".safetensors" or entry.is_dir() and any(
                        entry.glob("*.safetensors")):
                    paths.setdefault(name, entry.resolve())
        self.paths = paths

    def names(self) -> list[str]:
        return sorted(self.paths)

    def a1111_list(self) -> list[dict]:
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}} for name, path in
                sorted(self.paths.items())]

    def resolve(self, name: str, field: str) -> Path:
        if name not in self.paths:
            served = ", ".join(self.names()) or "none; start the server with --lora-dir FOLDER"
            raise ApiError(422, f"{field}: unknown LoRA {name!r} (served: {served})", param=field)
        return self.paths[name]

    def name_of(self, path: str) -> str | None:
        for name, own in self.paths.items():
            if str(own) == str(path):
                return name
        return None


def split_tags(prompt: str, field: str = "prompt") -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:name:weight>` tags, and the tags' (name, weight) pairs."""
    found = []
    if not TAG.search(prompt):
        return prompt, found
    for match in TAG.finditer(prompt):
        weight_text = (match.group(2) or "1").split(":")[0].strip() or "1"
        try:
            weight = float(weight_text)
        except ValueError:
            raise ApiError(422, f"{field}: the weight in {match.group(0)!r} is not a number", param=field) from None
        found.append((match.group(1).strip(), weight))
    text = re.sub(r"\s+", " ", TAG.sub(" ", prompt))
    text = re.sub(r"\s+,", ",", text).strip(" ,")
    return text, found
