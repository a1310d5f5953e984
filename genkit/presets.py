"""Pipeline presets: `pipelines/<name>.toml` names where a model comes from and its defaults.

Presets ship inside the wheel (as `genkit._pipelines`); a user may add their own in
`$GENKIT_HOME/pipelines/`, which take precedence. Adding a model family is adding a file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from genkit.errors import GenkitError

DEFAULT_MODEL = "genkit-mini"
KINDS = ("genkit", "diffusers")
DEFAULT_KEYS = {"width", "height", "num_inference_steps", "guidance_scale", "scheduler", "negative_prompt"}


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "genkit" (genkit-mini family) or "diffusers" (any diffusers text-to-image pipeline)
    source: str  # "package:<path inside genkit>", a local folder, or a hub id
    description: str = ""
    defaults: dict = field(default_factory=dict)

    def location(self) -> str:
        """The folder or hub id to load from."""
        if self.source.startswith("package:"):
            return str(resources.files("genkit").joinpath(self.source.removeprefix("package:")))
        return self.source


def packaged_dir(package: str, source_folder: str):
    """`genkit.<package>` when installed; the repository's folder when running from a checkout."""
    try:
        return resources.files(f"genkit.{package}")
    except ModuleNotFoundError:  # genkit imported from a source tree that is not installed
        return Path(__file__).resolve().parents[1] / source_folder


def genkit_home() -> Path:
    return Path(os.environ.get("GENKIT_HOME") or Path.home() / ".genkit")


def _preset_files() -> dict[str, object]:
    files = {}
    for entry in packaged_dir("_pipelines", "pipelines").iterdir():
        if entry.name.endswith(".toml"):
            files[entry.name[:-5]] = entry
    user = genkit_home() / "pipelines"
    if user.is_dir():
        files.update({p.stem: p for p in user.glob("*.toml")})
    return files


def names() -> list[str]:
    return sorted(_preset_files())


def get(name: str) -> Preset | None:
    entry = _preset_files().get(name)
    if entry is None:
        return None
    try:
        raw = tomllib.loads(entry.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise GenkitError(f"preset {name} is not valid TOML: {exc}") from None
    defaults = raw.pop("defaults", {})
    unknown = set(defaults) - DEFAULT_KEYS
    if unknown or raw.get("kind") not in KINDS or "source" not in raw:
        raise GenkitError(f"preset {name} is malformed (needs kind in {KINDS}, source, and [defaults] keys among "
                          f"{sorted(DEFAULT_KEYS)})")
    return Preset(name=raw.get("name", name), kind=raw["kind"], source=raw["source"],
                  description=raw.get("description", ""), defaults=defaults)
