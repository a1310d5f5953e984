"""Does a ControlNet steer genkit-mini? The pieces of benchmarks/controlnet_train.py (issue #28).

- `make_dataset`: a folder of shapes-world scenes (one and two objects, as genkit-mini was trained on), each with
  its caption, for `genkit train controlnet`;
- `placement_scenes`: judged scenes of one object at one of the five named positions, whose prompt names only its
  colour and shape ("a red circle"), and whose control map is the canny edge map of that scene drawn;
- `contradicting_scenes`: the same, with a prompt that names another position than the control map's;
- `judge_placement`: where the judge (genkit.eval.judge) finds the asked object in each image made, against where
  the control map put it (and, for contradictions, where the prompt put it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from genkit.data import shapes


def make_dataset(folder, *, n: int, resolution: int = 32, seed: int = 0) -> int:
    """`n` random scenes of the shapes world (half of them two-object scenes) as PNGs with .txt captions."""
    from genkit.outputs import save_png, save_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = shapes.random_scene(seed * 1_000_003 + i)
        path = folder / f"scene-{i:05d}.png"
        save_png(shapes.render(scene, resolution, color_jitter=12, seed=i), path)
        save_text(path.with_suffix(".txt"), scene.caption + "\n")
    return n


TEMPLATE = "a {size} {color} {shape} {pos}"  # the training world's first phrasing; no size, and a position or none


@dataclass(frozen=True)
class PlacementScene:
    prompt: str
    color: str
    shape: str
    control_position: str  # where the control map draws the object
    prompt_position: str | None  # where the prompt puts it (None: the prompt names no position)
    control: object  # the control map, a PIL image (canny edges of the drawn scene)
    seed: int


def _scene(rng: random.Random, position: str, resolution: int):
    from genkit.controlnet import canny

    scene = shapes.single_object_scene(rng, position=position, state_position=False, state_size=False)
    drawn = shapes.render(scene, resolution, seed=rng.randrange(2**31))
    return scene.objects[0], canny(drawn).convert("RGB")


def placement_scenes(n: int = 100, *, resolution: int = 32, seed: int = 0) -> list[PlacementScene]:
    """`n` one-object scenes, the positions in turn (20 each of 100), prompts without a position."""
    rng, positions = random.Random(f"controlnet-placement-{seed}"), list(shapes.POSITIONS)
    scenes = []
    for i in range(n):
        obj, control = _scene(rng, positions[i % len(positions)], resolution)
        prompt = shapes.single_caption(obj.color, obj.shape, template=TEMPLATE)  # "an orange triangle"
        scenes.append(PlacementScene(prompt, obj.color, obj.shape, obj.position, None,
                                     control, seed * 100_000 + i))
    return scenes


def contradicting_scenes(n: int = 100, *, resolution: int = 32, seed: int = 0) -> list[PlacementScene]:
    """`n` one-object scenes whose prompt names a position the control map does not draw the object at."""
    rng, positions = random.Random(f"controlnet-contradiction-{seed}"), list(shapes.POSITIONS)
    scenes = []
    for i in range(n):
        obj, control = _scene(rng, positions[i % len(positions)], resolution)
        asked = rng.choice([p for p in positions if p != obj.position])
        prompt = shapes.single_caption(obj.color, obj.shape, position=asked, template=TEMPLATE, rng=rng)
        scenes.append(PlacementScene(prompt, obj.color, obj.shape, obj.position, asked, control,
                                     seed * 100_000 + i))
    return scenes


@dataclass(frozen=True)
class Placement:
    found: bool  # an object of the asked colour and shape was found (else: the largest object, if any, counts)
    position: str | None  # where the judge put it (nearest named position)
    at_control: bool
    at_prompt: bool


def judge_placement(image, scene: PlacementScene) -> Placement:
    """Where the asked object is in `image`: the judge's object of the asked colour and shape, else its largest
    object (a wrong colour or shape still has a place); None when nothing is drawn."""
    from genkit.eval.judge import judge

    judged = judge(image)
    asked = judged.find(scene.color, scene.shape)
    obj = asked[0] if asked else (judged.objects[0] if judged.objects else None)
    position = obj.position if obj is not None else None
    return Placement(bool(asked), position, position == scene.control_position,
                     scene.prompt_position is not None and position == scene.prompt_position)


def summary(placements: list[Placement]) -> dict:
    n = max(1, len(placements))
    return {"scenes": len(placements),
            "at_control": round(100 * sum(p.at_control for p in placements) / n, 1),
            "at_prompt": round(100 * sum(p.at_prompt for p in placements) / n, 1),
            "found": round(100 * sum(p.found for p in placements) / n, 1),
            "nothing": round(100 * sum(p.position is None for p in placements) / n, 1)}
