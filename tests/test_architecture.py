"""The import rules of ARCHITECTURE.md, checked on the source (every import, also those inside functions)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genkit"

# the parts that make images (the library's inference side and the server)
INFERENCE = ("genkit.generate", "genkit.loader", "genkit.families.genkit_mini.model", "genkit.lora", "genkit.edit", "genkit.images",
             "genkit.families", "genkit.invariance", "genkit.schedulers", "genkit.outputs", "genkit.prompts",
             "genkit.presets", "genkit.attention", "genkit.cpu", "genkit.run", "genkit.serve")
COMMAND_LINE = ("genkit.cli", "genkit.__main__", "genkit.serve.command")  # the only modules that may use click
MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "accelerate")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in `path` names (relative imports resolved)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from genkit import train`
    return found


GRAPH = {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def reachable(start: str) -> set[str]:
    """genkit modules `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for name in GRAPH.get(todo.pop(), ()):
            if name in GRAPH and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if within(m, INFERENCE) and not within(m, COMMAND_LINE)))
def test_inference_never_imports_training_or_the_command_line(module):
    bad = sorted(m for m in reachable(module) if within(m, ("genkit.train",) + COMMAND_LINE))
    assert not bad, f"{module} reaches {bad}"


def test_only_the_command_line_uses_click():
    users = sorted(m for m, names in GRAPH.items() if within("click", names) or any(within(n, ("click",)) for n in names))
    assert set(users) <= set(COMMAND_LINE), users


def test_datasets_know_nothing_of_models():
    for module in (m for m in GRAPH if within(m, ("genkit.data",))):
        bad = sorted(n for n in GRAPH[module] if within(n, MODEL_LIBRARIES) or
                     (n in GRAPH and not within(n, ("genkit.data", "genkit.errors", "genkit.files"))))
        assert not bad, f"{module} imports {bad}"


def test_file_helpers_need_nothing_of_genkit():
    assert not [n for n in GRAPH["genkit.files"] if n in GRAPH], GRAPH["genkit.files"]


def test_the_judge_reads_pixels_only():
    for module in (m for m in GRAPH if within(m, ("genkit.eval.judge",))):
        bad = sorted(n for n in GRAPH[module] if within(n, MODEL_LIBRARIES + ("torch",)))
        assert not bad, f"{module} imports {bad}"


def test_the_package_and_benchmarks_never_import_tests():
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")]:
        bad = sorted(n for n in imports_of(path) if within(n, ("tests",)))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_checker_sees_imports_inside_functions():
    """A rule is only as good as its graph: genkit.cli imports the trainers inside its commands."""
    assert "genkit.train.lora" in GRAPH["genkit.cli"] and "genkit.train" not in reachable("genkit.generate")


# --- The family seam: only genkit/families/ (and the tiny models, the presets) names a model family --------------
FAMILY_HOMES = ("genkit.families", "genkit.testing", "genkit.presets")
FAMILY_OF = re.compile(r"family\.name\b|\[['\"]family['\"]\]|get\(['\"]family['\"]")  # a family's name, read


def _family_names() -> set[str]:
    from genkit import families

    return set(families.names())


def _docstrings(tree) -> set[int]:
    """ids of the string constants that are docstrings (prose may mention a family)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def family_mentions(source: str, names: set[str]) -> list[str]:
    """Where `source` names a family: a string that is a family's name (or holds one as a word in an f-string's
    literal part), or a comparison of something's family with a string."""
    tree = ast.parse(source)
    prose = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if node.value in names:
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            strings = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str) or
                       isinstance(s, (ast.Tuple, ast.List, ast.Set)) and s.elts and
                       all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)]
            if strings and any(FAMILY_OF.search(ast.unparse(s)) for s in sides if s not in strings):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if within(m, ("genkit",)) and not within(m, FAMILY_HOMES)))
def test_only_the_families_name_a_family(module):
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = family_mentions(path.read_text(), _family_names())
    assert not found, f"{module} names a model family (move it behind a Family member): {found}"


def test_the_family_rule_sees_names_and_comparisons():
    names = {"sd", "genkit-mini"}
    assert family_mentions('if pipeline.family.name == "genkit-mini": pass', names)
    assert family_mentions('ok = record.get("family") in ("a", "b")', names)
    assert family_mentions('FAMILIES = ("sd", "x")', names)
    assert not family_mentions('if family.lora_layout == "peft": pass', names)
    assert not family_mentions('def f():\n    """Stable Diffusion ("sd") reads CLIP."""\n    return family.flow', names)
