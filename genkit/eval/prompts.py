"""The evaluation prompt set: four groups of shapes-world prompts, each asking a different question.

- seen: colour-shape pairs and phrasings from training. Does the model do what it was taught?
- held-out: the `HELD_OUT_PAIRS`, never drawn in training, in training phrasings. Does it compose
  colour and shape, or has it memorised pairs?
- unseen-phrasing: seen pairs in the `HELD_OUT_TEMPLATES` phrasings. Does it read the words, or
  match whole captions?
- two-object: two objects from the training pairs and how they relate. Does it bind each colour
  to its shape and place them as asked?

Captions come from the same `shapes` functions that caption the training data, so the only
difference between training and evaluation is the one each group is built to test. The set is
deterministic for a seed, and each item carries the scene its caption was drawn from, so a
reference renderer can stand in for a model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from genkit.data import shapes
from genkit.eval.judge import Spec


class Group(str, Enum):
    SEEN = "seen"
    HELD_OUT = "held-out"
    UNSEEN_PHRASING = "unseen-phrasing"
    TWO_OBJECT = "two-object"


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    group: Group
    spec: Spec  # what the prompt asks for, for scoring
    seed: int  # generation seed for this prompt
    scene: shapes.Scene  # the scene the caption was drawn from: ground truth for reference renders
    template: str | None = None  # single-object phrasing used; None for two objects


def build_prompts(
    seed: int = 0,
    *,
    seen: int = 200,
    held_out: int = 100,
    unseen_phrasing: int = 100,
    two_object: int = 200,
) -> list[EvalItem]:
    """The evaluation set, group by group; the same seed always gives the same items."""
    counts = {Group.SEEN: seen, Group.HELD_OUT: held_out, Group.UNSEEN_PHRASING: unseen_phrasing,
              Group.TWO_OBJECT: two_object}
    for group, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"the {group.value} count must be a whole number >= 0, got {count!r}")
    items = []
    for group, count in counts.items():
        rng = random.Random(f"genkit-eval-{seed}-{group.value}")  # one stream per group: counts don't interact
        items += [_item(group, i, rng) for i in range(count)]
    return items


def _item(group: Group, index: int, rng: random.Random) -> EvalItem:
    scene, template = _scene(group, index, rng)
    return EvalItem(
        prompt=scene.caption,
        group=group,
        spec=Spec.from_scene(scene),
        seed=rng.randrange(2**31),
        scene=scene,
        template=template,
    )


def _scene(group: Group, index: int, rng: random.Random) -> tuple[shapes.Scene, str | None]:
    """The scene for one item; phrasings and held-out pairs are cycled so each is asked evenly."""
    if group is Group.TWO_OBJECT:
        return shapes.two_object_scene(rng), None
    if group is Group.UNSEEN_PHRASING:
        template = shapes.HELD_OUT_TEMPLATES[index % len(shapes.HELD_OUT_TEMPLATES)]
        # always with a position: without one "{Pos}: a {color} {shape}" is a training caption
        return shapes.single_object_scene(rng, template=template, state_position=True), template
    template = rng.choice(shapes.TRAIN_TEMPLATES)
    if group is Group.HELD_OUT:
        color, shape = sorted(shapes.HELD_OUT_PAIRS)[index % len(shapes.HELD_OUT_PAIRS)]
        return shapes.single_object_scene(rng, color=color, shape=shape, template=template,
                                          include_held_out=True), template
    return shapes.single_object_scene(rng, template=template), template
