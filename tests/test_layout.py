"""README's Layout and ARCHITECTURE.md name every part of the package's top level, and nothing that is not there."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genkit"


def top_level() -> set[str]:
    """The package's top-level modules and folders (`name.py`, `name/`)."""
    return {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
            if (p.is_dir() and p.name != "__pycache__") or p.suffix == ".py"}


def layout_entries() -> set[str]:
    """The entries of README's Layout tree one level under genkit/ (indented by two spaces)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    tree = block[block.index("```") + 3:]
    tree = tree[:tree.index("```")]
    return {m.group(1) for m in re.finditer(r"^  (\S+)\s", tree, re.M)}


def test_the_readme_layout_is_the_tree():
    named, there = layout_entries(), top_level()
    assert not there - named, f"README's Layout does not name {sorted(there - named)}"
    assert not named - there, f"README's Layout names {sorted(named - there)}, which are not in genkit/"


def test_architecture_names_every_part():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    modules = {f"genkit.{name.removesuffix('.py').removesuffix('/')}" for name in top_level()
               if name not in ("__init__.py", "__main__.py", "weights/")}
    missing = sorted(m for m in modules if not re.search(rf"`{re.escape(m)}[`.]", text))
    assert not missing, f"ARCHITECTURE.md does not name {missing}"
    for name in set(re.findall(r"`(genkit(?:\.[A-Za-z_0-9]+)+)", text)):
        assert resolves(name), f"ARCHITECTURE.md names {name}, which is not in the package"


def resolves(name: str) -> bool:
    """`name` is a module of the package, or a member of one (genkit.load, genkit.outputs.atomic_write)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False
