"""One progress-bar rule: every genkit bar is `genkit.progress.progress_bar`, shown exactly when `progress` is true."""

import ast
import io
from pathlib import Path

from genkit.progress import progress_bar

ROOT = Path(__file__).resolve().parents[1]


def test_a_bar_shows_exactly_when_progress_is_true():
    shown, hidden = io.StringIO(), io.StringIO()  # neither is a terminal: that alone hides nothing
    assert list(progress_bar(range(3), progress=True, desc="generate", file=shown)) == [0, 1, 2]
    assert list(progress_bar(range(3), progress=False, desc="generate", file=hidden)) == [0, 1, 2]
    assert "generate" in shown.getvalue() and "3/3" in shown.getvalue() and hidden.getvalue() == ""


def test_every_bar_is_made_by_the_one_helper():
    makers = []
    for path in sorted((ROOT / "genkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("tqdm", "tqdm.tqdm", "tqdm.auto.tqdm", "trange"):
                makers.append(str(path.relative_to(ROOT)))
    assert makers == ["genkit/progress.py"]
