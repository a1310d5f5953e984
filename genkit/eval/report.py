"""Run a generator over the evaluation prompts, judge every image, and report rates per group.

The generator is any `generate_fn(prompts, seeds) -> list[PIL.Image]`: the caller wires in the real
pipeline; tests pass a renderer of the ground-truth scenes. `evaluate` returns every image with
its judgement and score, plus per-group rates; `format_table` prints them and `save_grid` shows
them, each prompt under its image and the wrong ones marked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from genkit.eval.judge import Judgement, Score, judge, score
from genkit.eval.prompts import EvalItem, Group
from genkit.grid import make_grid
from genkit.outputs import save_png

GenerateFn = Callable[[list[str], list[int]], list[Image.Image]]
METRICS = ("color", "shape", "position", "size", "all_correct", "both_present", "relation")
HEADERS = {"color": "colour", "shape": "shape", "position": "position", "size": "size",
           "all_correct": "all-correct", "both_present": "both-present", "relation": "relation"}
WRONG = "x "  # grid label prefix for images that are not all-correct


@dataclass(frozen=True)
class ItemResult:
    item: EvalItem
    image: Image.Image
    judgement: Judgement
    score: Score


@dataclass(frozen=True)
class Rate:
    """`hits` right out of `n` items that asked for it."""

    hits: int
    n: int

    @property
    def value(self) -> float | None:
        return self.hits / self.n if self.n else None

    def __str__(self) -> str:
        return "-" if not self.n else f"{100 * self.hits / self.n:.1f}% ({self.n})"


@dataclass(frozen=True)
class GroupRates:
    group: Group
    n: int  # items in the group
    color: Rate
    shape: Rate
    position: Rate  # over items that state a position
    size: Rate  # over items that state a size
    all_correct: Rate
    both_present: Rate  # two-object items
    relation: Rate  # two-object items with a spatial relation (not "and")


@dataclass(frozen=True)
class EvalResult:
    items: list[ItemResult]
    groups: dict[Group, GroupRates]  # in Group order, only groups that have items

    def as_dict(self) -> dict:
        """Rates as plain numbers, for JSON: {group: {metric: rate or None, "n": count}}."""
        return {
            group.value: {"n": rates.n} | {m: getattr(rates, m).value for m in METRICS}
            for group, rates in self.groups.items()
        }


def evaluate(generate_fn: GenerateFn, items: Sequence[EvalItem], *, batch_size: int = 16,
             progress: bool = False) -> EvalResult:
    """Generate an image for every item, `batch_size` prompts per call, and judge each."""
    from genkit.progress import progress_bar

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results = []
    for start in progress_bar(range(0, len(items), batch_size), desc="eval", unit="batch", progress=progress):
        batch = list(items[start : start + batch_size])
        images = generate_fn([it.prompt for it in batch], [it.seed for it in batch])
        if len(images) != len(batch):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(batch)} prompts")
        for item, image in zip(batch, images):
            judgement = judge(image)
            results.append(ItemResult(item, image, judgement, score(judgement, item.spec)))
    return EvalResult(items=results, groups=_group_rates(results))


def _group_rates(results: list[ItemResult]) -> dict[Group, GroupRates]:
    rates = {}
    for group in Group:
        scores = [r.score for r in results if r.item.group is group]
        if scores:
            rates[group] = GroupRates(group, len(scores), **{m: _rate(scores, m) for m in METRICS})
    return rates


def _rate(scores: list[Score], metric: str) -> Rate:
    """Share of True among the scores where `metric` applies (is not None)."""
    asked = [getattr(s, metric) for s in scores if getattr(s, metric) is not None]
    return Rate(sum(asked), len(asked))


def text_table(head, rows) -> str:
    """The plain-text tables of genkit's reports and benchmarks: a header, a rule, then the rows; the first column
    left-aligned, the others right-aligned (numbers line up)."""
    rows = [[str(cell) for cell in row] for row in (head, *rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(result: EvalResult) -> str:
    """Plain-text table: a row per group, a column per metric, '-' where a group never asks it."""
    return text_table(["group", "n"] + [HEADERS[m] for m in METRICS],
                      [[g.value, r.n] + [getattr(r, m) for m in METRICS] for g, r in result.groups.items()])


def grid_labels(result: EvalResult) -> list[str]:
    """Each prompt, with wrong ones prefixed by `WRONG` and followed by what the judge saw."""
    return [_label(r) for r in result.items]


def _label(r: ItemResult) -> str:
    if r.score.all_correct:
        return r.item.prompt
    seen = ", ".join(f"{o.color} {o.shape}" for o in r.judgement.objects) or "nothing"
    return f"{WRONG}{r.item.prompt} | saw {seen}"


def save_grid(result: EvalResult, path, *, cols: int = 20, cell: int = 96) -> Path:
    """Write every image as one grid PNG, its label beneath it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid([r.image for r in result.items], grid_labels(result), cols=cols, cell=cell, label_lines=4)
    save_png(grid, path)
    return path
