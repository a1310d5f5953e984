"""A new concept for genkit-mini, as a person's own folder would teach it, and how well a LoRA learned it.

A concept is a shape genkit-mini never saw (`shapes.EXTRA_SHAPES`: star, heart, ...), named with a
trigger word in its captions ("a red zqx heart on the left") and shown in two or three colours only.
`make_dataset` draws such a folder; `concept_prompts` asks for the concept in every colour (the
training colours and the ones never shown with it); `judge_concept` scores generated images with the
judge; `standard_set` is `genkit eval`'s prompt set, to measure what the LoRA costs the base model.
Used by benchmarks/lora_concepts.py (the concept suite) and examples/lora_star.py.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

# training phrasings of the concept captions (a subset of shapes.TRAIN_TEMPLATES); the prompts use them too
TEMPLATES = (
    "a {size} {color} {shape} {pos}",
    "{color} {shape}, {pos}",
    "an image of a {size} {color} {shape} {pos}",
    "a picture showing a {color} {shape} {pos}",
)
STANDARD = {"seen": 200, "held_out": 100, "unseen_phrasing": 100, "two_object": 200}  # genkit eval's defaults


@dataclass(frozen=True)
class Concept:
    shape: str  # one of shapes.EXTRA_SHAPES
    trigger: str  # the word that names it in captions and prompts
    colors: tuple[str, ...]  # the colours the training images show


def concept_scene(concept: Concept, rng: random.Random, color: str, **options):
    """A one-object scene of the concept whose caption carries the trigger word before the shape's name."""
    from genkit.data import shapes

    scene = shapes.single_object_scene(rng, color=color, shape=concept.shape, **options)
    return replace(scene, caption=re.sub(rf"\b{concept.shape}\b", f"{concept.trigger} {concept.shape}", scene.caption))


def make_dataset(concept: Concept, folder, *, n: int = 32, resolution: int = 32, seed: int = 0):
    """`n` images of the concept in its colours, every position and size in turn, with .txt captions."""
    from genkit.data import shapes
    from genkit.outputs import save_png, save_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"concept-data-{concept.shape}-{seed}")
    positions, sizes = list(shapes.POSITIONS), list(shapes.SIZES)
    written = []
    for i in range(n):
        color = concept.colors[i % len(concept.colors)]
        k = i // len(concept.colors)  # per colour: every position x size once, then again
        scene = concept_scene(concept, rng, color, position=positions[k % len(positions)],
                              size=sizes[(k // len(positions)) % len(sizes)], state_position=k % 4 != 3,
                              template=TEMPLATES[i % len(TEMPLATES)])
        path = folder / f"{concept.shape}-{i:03d}.png"
        save_png(shapes.render(scene, resolution, color_jitter=12, seed=rng.randrange(2**31)), path)
        save_text(path.with_suffix(".txt"), scene.caption + "\n")
        written.append((path, scene.caption))
    return written


@dataclass(frozen=True)
class ConceptPrompt:
    prompt: str
    color: str
    seen_color: bool  # one of the training colours
    spec: object  # genkit.eval.judge.Spec
    seed: int


def concept_prompts(concept: Concept, per_color: int = 10, *, seed: int = 0) -> list[ConceptPrompt]:
    """`per_color` prompts for each colour of the shapes world, alternately with and without a position."""
    from genkit.data import shapes
    from genkit.eval.judge import Spec

    rng = random.Random(f"concept-eval-{concept.shape}-{seed}")
    prompts = []
    for color in shapes.COLORS:
        for i in range(per_color):
            scene = concept_scene(concept, rng, color, state_position=i % 2 == 0, template=TEMPLATES[i % len(TEMPLATES)])
            prompts.append(ConceptPrompt(scene.caption, color, color in concept.colors, Spec.from_scene(scene),
                                         rng.randrange(2**31)))
    return prompts


def candidates(*concepts: Concept) -> tuple[str, ...]:
    """The shapes an object may be read as: the base model's, and the concepts' the loaded LoRAs teach. (With every
    extra shape in play a thin star reads as a cross; a model that was never taught crosses does not draw them.)"""
    from genkit.data import shapes

    return shapes.SHAPES + tuple(dict.fromkeys(c.shape for c in concepts))


def judge_concept(concept: Concept, generate, prompts: list[ConceptPrompt], batch_size: int = 60) -> dict:
    """Generate and judge every prompt: per-prompt rows, the images, and the rates (`concept_figures`)."""
    from genkit.eval.judge import judge, score_single

    rows, images = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for item, image in zip(batch, generate([p.prompt for p in batch], [p.seed for p in batch])):
            found = judge(image, candidates=candidates(concept))
            rows.append({
                "prompt": item.prompt, "seed": item.seed, "color": item.color, "seen_color": item.seen_color,
                "found": any(o.shape == concept.shape for o in found.objects),
                "right_color": bool(found.find(item.color, concept.shape)),
                "all_correct": score_single(found, item.spec).all_correct,
                "saw": [f"{o.color} {o.shape}" for o in found.objects],
            })
            images.append(image)
    return {"rows": rows, "images": images, "figures": concept_figures(rows)}


def concept_figures(rows: list[dict]) -> dict:
    """Rates of concept found / of the asked colour / all-correct: overall, training and unseen colours."""
    def rates(subset):
        n = len(subset)
        return {"n": n} | {key: (sum(r[key] for r in subset) / n if n else None)
                           for key in ("found", "right_color", "all_correct")}

    return {"overall": rates(rows), "seen_colors": rates([r for r in rows if r["seen_color"]]),
            "unseen_colors": rates([r for r in rows if not r["seen_color"]])}


def pair_prompts(a: Concept, b: Concept, n: int = 40, *, seed: int = 0) -> list[ConceptPrompt]:
    """Two-object prompts naming both concepts ("a red zqx heart left of a blue sks star"), colours drawn from all."""
    from genkit.data import shapes
    from genkit.eval.judge import Spec

    rng = random.Random(f"concept-pair-{a.shape}-{b.shape}-{seed}")
    prompts = []
    for i in range(n):
        first, second = rng.sample(list(shapes.COLORS), 2)
        pair = (a, b) if i % 2 == 0 else (b, a)
        scene = shapes.two_object_scene(rng, a=(first, pair[0].shape), b=(second, pair[1].shape))
        caption = scene.caption
        for c in pair:
            caption = re.sub(rf"\b{c.shape}\b", f"{c.trigger} {c.shape}", caption)
        scene = replace(scene, caption=caption)
        prompts.append(ConceptPrompt(caption, f"{first}+{second}", False, Spec.from_scene(scene), rng.randrange(2**31)))
    return prompts


def judge_pair(a: Concept, b: Concept, generate, prompts: list[ConceptPrompt], batch_size: int = 60) -> dict:
    """Both concepts drawn in one image: the share with both shapes found, each found, and all-correct."""
    from genkit.eval.judge import judge, score_two

    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for item, image in zip(batch, generate([p.prompt for p in batch], [p.seed for p in batch])):
            found = judge(image, candidates=candidates(a, b))
            drawn = {o.shape for o in found.objects}
            rows.append({"prompt": item.prompt, "seed": item.seed, a.shape: a.shape in drawn, b.shape: b.shape in drawn,
                         "both": {a.shape, b.shape} <= drawn, "all_correct": score_two(found, item.spec).all_correct,
                         "saw": [f"{o.color} {o.shape}" for o in found.objects]})
    n = len(rows)
    rates = {key: sum(r[key] for r in rows) / n for key in (a.shape, b.shape, "both", "all_correct")}
    return {"rows": rows, "figures": {"n": n, **rates}}


def generate_fn(pipeline, config):
    """(prompts, seeds) -> images through the engine, each image with its own seed."""
    from genkit.prompts import PromptSpec

    def generate(prompts, seeds):
        return pipeline.generate([PromptSpec(p, seed=s) for p, s in zip(prompts, seeds)], config).images

    return generate


def standard_set(generate, counts: dict = STANDARD, *, seed: int = 0, batch_size: int = 50) -> dict:
    """genkit eval's prompt set: all-correct per group and pooled ("overall")."""
    from genkit.eval.prompts import build_prompts
    from genkit.eval.report import evaluate

    result = evaluate(generate, build_prompts(seed, **counts), batch_size=batch_size, progress=False)
    all_correct = {g.value: r.all_correct.value for g, r in result.groups.items()}
    all_correct["overall"] = sum(r.score.all_correct for r in result.items) / len(result.items)
    return all_correct


def drop_points(before: dict, after: dict) -> dict:
    """All-correct drop in percentage points (positive = worse with the LoRA), per group and overall."""
    return {k: round(100 * (before[k] - after[k]), 2) for k in before if before[k] is not None}
