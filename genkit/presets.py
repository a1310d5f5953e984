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
KINDS = ("genkit", "diffusers")  # older presets name a kind; a family (genkit.families) says more
DEFAULT_KEYS = {"width", "height", "num_inference_steps", "guidance_scale", "scheduler", "negative_prompt"}


@dataclass(frozen=True)
class Preset:
    name: str
    family_name: str  # a genkit.families name: genkit-mini, sd, sdxl, sd3, flux, pixart-sigma, sana
    source: str  # "package:<path inside genkit>", a local folder, or a hub id
    description: str = ""
    defaults: dict = field(default_factory=dict)
    base: str | None = None  # a single-file source's base: the preset or folder its configs come from (genkit.single_file)

    @property
    def family(self):
        from genkit import families

        return families.get(self.family_name)

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
    from genkit import families

    defaults = raw.pop("defaults", {})
    unknown = set(defaults) - DEFAULT_KEYS
    family = raw.get("family") or {"genkit": "genkit-mini", "diffusers": "sd"}.get(raw.get("kind"))
    if unknown or family not in families.names() or "source" not in raw:
        raise GenkitError(f"preset {name} is malformed (needs family among {', '.join(families.names())}, source, and "
                          f"[defaults] keys among {sorted(DEFAULT_KEYS)})")
    return Preset(name=raw.get("name", name), family_name=family, source=raw["source"],
                  description=raw.get("description", ""), defaults=defaults, base=raw.get("base"))
