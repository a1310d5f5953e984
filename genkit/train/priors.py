"""Prior-preservation images (DreamBooth's "class images"): made once per run, beside it, reused on resume.

A LoRA trained on a handful of images of one new concept also learns to draw everything like them;
mixing in images of what the base model already draws, under their own captions, pulls it back
wherever it strays (Ruiz et al. 2022, https://arxiv.org/abs/2208.12242). Two sources:

- `render`, for genkit-mini: scenes of its own training world (`genkit.data.shapes`), drawn by the
  renderer that made its training data. The base model already minimises its loss on these, so they
  cost it nothing to keep (measured: half the drift of generated priors, configs/lora.toml).
- `model`, for every other family: the base model's own images of each training caption with its
  trigger words removed ("a photo of sks dog" -> "a photo of dog"), DreamBooth's recipe.

The images and their captions go to a folder (`OUT/priors`); `priors.json` is written last, naming
what was made, so a killed run makes them again and a resumed one reuses them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from genkit.errors import GenkitError

MANIFEST = "priors.json"
SOURCES = ("render", "model")
SCENE_SEED = 10**6  # render seeds start past the base model's training scenes' first draws
IMAGE_SEED = 7_000_000  # generation seeds of model priors


@dataclass(frozen=True)
class PriorPlan:
    source: str  # "render" or "model"
    images: int
    seed: int = 0
    resolution: int = 32  # render only
    captions: tuple[str, ...] = ()  # model only: the class captions, cycled to `images`

    def __post_init__(self):
        if self.source not in SOURCES:
            raise GenkitError(f"prior source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 0:
            raise GenkitError(f"prior images must be a whole number >= 0, got {self.images!r}")
        if self.source == "model" and self.images and not self.captions:
            raise GenkitError("model priors need class captions (the training captions without trigger words)")


def without_trigger_words(caption: str, trigger_words) -> str:
    """The caption with each trigger word removed as a whole word (any case), spaces tidied."""
    for word in sorted({w for w in trigger_words if w.strip()}, key=len, reverse=True):
        caption = re.sub(rf"(?<!\w){re.escape(word.strip())}(?!\w)", " ", caption, flags=re.IGNORECASE)
    return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", caption)).strip(" ,")


def find_trigger_words(captions, tokenizer=None, share: float = 0.25) -> tuple[str, ...]:
    """Words that name a new concept: in at least `share` of the captions, and not a word the text encoder
    knows (its tokenizer splits it into pieces, as WordPiece does "zqx" -> z ##q ##x). Empty without a tokenizer."""
    if tokenizer is None or not captions:
        return ()
    counts: dict[str, int] = {}
    for caption in captions:
        for word in set(re.findall(r"[a-z0-9]+", caption.lower())):
            counts[word] = counts.get(word, 0) + 1
    common = sorted(w for w, c in counts.items() if c >= max(1, share * len(captions)) and not w.isdigit())
    return tuple(w for w in common if len(tokenizer.tokenize(w)) > 1)


def class_captions(captions, trigger_words) -> tuple[str, ...]:
    """Distinct class captions, in first-seen order, of the training captions without their trigger words."""
    return tuple(dict.fromkeys(c for c in (without_trigger_words(c, trigger_words) for c in captions) if c))


def _cached(folder: Path, plan: PriorPlan) -> list[tuple[Path, str]] | None:
    try:
        made = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(made, dict) or made.get("plan") != json.loads(json.dumps(asdict(plan))):
        return None
    items = [(folder / name, caption) for name, caption in made.get("images", [])]
    return items if len(items) == plan.images and all(path.is_file() for path, _ in items) else None


def make_priors(folder: str | Path, plan: PriorPlan, *, pipeline=None, batch_size: int = 16,
                progress: bool = False) -> list[tuple[Path, str]]:
    """(image path, caption) of the plan's prior images in `folder`, made now or found from an earlier run."""
    from genkit.outputs import save_png, save_text

    folder = Path(folder)
    found = _cached(folder, plan)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    images = _render(plan) if plan.source == "render" else _generate(plan, pipeline, batch_size, progress)
    items = []
    for i, (image, caption) in enumerate(images):
        path = folder / f"prior-{i:05d}.png"
        save_png(image, path)
        items.append((path, caption))
    record = {"plan": asdict(plan), "images": [[path.name, caption] for path, caption in items]}
    save_text(folder / MANIFEST, json.dumps(record, indent=1) + "\n")
    return items


def _render(plan: PriorPlan):
    from genkit.data import shapes

    for i in range(plan.images):
        scene = shapes.random_scene(SCENE_SEED + plan.seed * 10**4 + i)
        yield shapes.render(scene, plan.resolution, color_jitter=12, seed=i), scene.caption


def _generate(plan: PriorPlan, pipeline, batch_size: int, progress: bool):
    from genkit.generate import GenerationConfig
    from genkit.prompts import PromptSpec

    if pipeline is None:
        raise GenkitError("model priors need the base model (pass pipeline=)")
    captions = [plan.captions[i % len(plan.captions)] for i in range(plan.images)]
    specs = [PromptSpec(caption, seed=IMAGE_SEED + plan.seed * 10**4 + i) for i, caption in enumerate(captions)]
    for batch in pipeline.iter_generate(specs, GenerationConfig(batch_size=batch_size), progress=progress):
        yield from zip(batch.images, (record["prompt"] for record in batch.metadata))
