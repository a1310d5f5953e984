"""The judge reads rendered scenes back correctly, the prompt set is stable, and evaluate scores honestly."""

import random

import numpy as np
import pytest
from PIL import Image

from genkit.data import shapes
from genkit.eval.judge import ObjectSpec, Spec, judge, relation_between, score_single, score_two
from genkit.eval.prompts import Group, build_prompts
from genkit.eval.report import WRONG, evaluate, format_table, grid_labels, save_grid

ATTRIBUTES = ("count", "color", "shape", "position", "size", "relation")


def ground_truth_scene(seed):
    """Alternately one and two objects, held-out pairs included."""
    rng = random.Random(seed)
    if seed % 2:
        return shapes.two_object_scene(rng, include_held_out=True)
    return shapes.single_object_scene(rng, include_held_out=True)


def add_noise(image, sigma, seed):
    noise = np.random.default_rng(seed).normal(0, sigma, (image.height, image.width, 3))
    pixels = np.asarray(image, dtype=float) + noise
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def true_relation(scene):
    a, b = scene.objects
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def judge_accuracy(seeds, sigma=0.0):
    """Per-attribute share of objects (or scenes, for count and relation) the judge got right."""
    hits = {a: [] for a in ATTRIBUTES}
    for seed in seeds:
        scene = ground_truth_scene(seed)
        image = shapes.render(scene, 32, color_jitter=12, seed=seed)
        found = judge(add_noise(image, sigma, seed) if sigma else image)
        hits["count"].append(found.count == len(scene.objects))
        nearest = [min(found.objects, key=lambda o: (o.center[0] - t.x) ** 2 + (o.center[1] - t.y) ** 2)
                   if found.objects else None for t in scene.objects]
        for truth, obj in zip(scene.objects, nearest):
            for name in ("color", "shape", "position", "size"):
                if getattr(truth, name) is not None:
                    hits[name].append(obj is not None and getattr(obj, name) == getattr(truth, name))
        if len(scene.objects) == 2:
            a, b = nearest
            hits["relation"].append(a is not None and a is not b and relation_between(a, b) == true_relation(scene))
    return {a: (sum(h) / len(h), len(h)) for a, h in hits.items()}


@pytest.mark.parametrize("sigma, count", [(0.0, 600), (6.0, 300)])
def test_judge_reads_ground_truth(sigma, count):
    accuracy = judge_accuracy(range(count), sigma)
    print(f"\njudge accuracy, noise sigma {sigma}/255:",
          ", ".join(f"{a} {rate:.2%} (n={n})" for a, (rate, n) in accuracy.items()))
    assert all(n >= 100 for _, n in accuracy.values()), accuracy
    for attribute, (rate, _) in accuracy.items():
        assert rate >= 0.98, (attribute, accuracy)


def star_scenes(repeats=5):
    """Every colour x position x size of the star, `repeats` times each (jittered centre and radius)."""
    rng = random.Random("stars")
    return [shapes.single_object_scene(rng, shape="star", color=color, position=position, size=size)
            for color in shapes.COLORS for position in shapes.POSITIONS for size in shapes.SIZES
            for _ in range(repeats)]


def single_object_rates(scenes, sigma):
    """Share of one-object scenes read with one object and the right attributes; what the shape was read as."""
    hits = {"count": 0, "shape": 0, "color": 0, "position": 0, "size": 0}
    read_as = {}
    for seed, scene in enumerate(scenes):
        image = shapes.render(scene, 32, color_jitter=12, seed=seed)
        found = judge(add_noise(image, sigma, seed) if sigma else image)
        truth = scene.objects[0]
        hits["count"] += found.count == 1
        for name in ("shape", "color", "position", "size"):
            hits[name] += bool(found.objects) and getattr(found.objects[0], name) == getattr(truth, name)
        shape = found.objects[0].shape if found.objects else None
        read_as[shape] = read_as.get(shape, 0) + 1
    return {k: v / len(scenes) for k, v in hits.items()}, read_as


@pytest.mark.parametrize("sigma", [0.0, 6.0])
def test_judge_reads_stars(sigma):
    """The star (shapes.EXTRA_SHAPES, never in training) is read like the others: >= 98% right."""
    scenes = star_scenes()
    rates, _ = single_object_rates(scenes, sigma)
    print(f"\nstars, noise sigma {sigma}/255 (n={len(scenes)}):", ", ".join(f"{k} {v:.2%}" for k, v in rates.items()))
    assert len(scenes) == 300 and {s.objects[0].color for s in scenes} == set(shapes.COLORS)
    for name, rate in rates.items():
        assert rate >= 0.98, (name, rates)


def test_judge_reads_stars_next_to_other_shapes_and_scores_them():
    rng = random.Random(5)
    for k in range(30):
        other = (list(shapes.COLORS)[k % 6], shapes.SHAPES[k % 3])
        star = (list(shapes.COLORS)[(k + 2) % 6], "star")
        scene = shapes.two_object_scene(rng, a=star, b=other)
        found = judge(shapes.render(scene, 32, color_jitter=12, seed=k))
        assert sorted((o.color, o.shape) for o in found.objects) == sorted([star, other]), scene.caption
        assert score_two(found, Spec((ObjectSpec(*star), ObjectSpec(*other)), scene.relation)).all_correct
    for size in (64, 128):
        scene = star_scenes(1)[7]
        found = judge(shapes.render(scene, size, color_jitter=12))
        assert [(o.color, o.shape) for o in found.objects] == [(scene.objects[0].color, "star")]


def test_judge_at_other_sizes():
    for size in (64, 128):
        for seed in range(10):
            scene = ground_truth_scene(seed)
            found = judge(shapes.render(scene, size, color_jitter=12, seed=seed))
            got = sorted((o.color, o.shape) for o in found.objects)
            assert got == sorted((o.color, o.shape) for o in scene.objects), (size, scene.caption)


def test_specks_ignored_and_touching_objects_split():
    obj = shapes.ShapeObject("circle", "blue", 0.5, 0.5, 0.15)
    image = shapes.render(shapes.Scene(objects=(obj,), caption=""), 32)
    image.paste((220, 30, 30), (3, 3, 5, 5))  # a 2x2 red speck
    found = judge(image)
    assert [(o.color, o.shape) for o in found.objects] == [("blue", "circle")]
    touching = (shapes.ShapeObject("circle", "orange", 0.36, 0.5, 0.15),
                shapes.ShapeObject("square", "yellow", 0.62, 0.5, 0.15))
    found = judge(shapes.render(shapes.Scene(objects=touching, caption=""), 32))
    assert sorted((o.color, o.shape) for o in found.objects) == [("orange", "circle"), ("yellow", "square")]
    orange, yellow = (next(o for o in found.objects if o.color == c) for c in ("orange", "yellow"))
    assert relation_between(orange, yellow) == "left of" and found.relation(0, 1) in ("left of", "right of")


def test_judge_blank_and_non_square():
    assert judge(Image.new("RGB", (32, 32), (238, 238, 236))).count == 0
    with pytest.raises(ValueError, match="square"):
        judge(Image.new("RGB", (32, 16)))


def render_objects(*objects, size=32):
    return judge(shapes.render(shapes.Scene(objects=tuple(objects), caption=""), size))


def test_score_single():
    red_left = shapes.ShapeObject("circle", "red", 0.25, 0.5, 0.11)
    spec = Spec((ObjectSpec("red", "circle", position="left", size="small"),))
    good = score_single(render_objects(red_left), spec)
    assert good.all_correct and good.size and good.position
    wrong_place = score_single(render_objects(red_left), Spec((ObjectSpec("red", "circle", position="right"),)))
    assert wrong_place.color and wrong_place.shape and wrong_place.position is False and not wrong_place.all_correct
    assert wrong_place.size is None  # not asked
    extra = score_single(render_objects(red_left, shapes.ShapeObject("square", "blue", 0.75, 0.5, 0.11)), spec)
    assert extra.count == 2 and not extra.all_correct
    assert not score_single(render_objects(), spec).all_correct
    with pytest.raises(ValueError, match="colour|color"):
        ObjectSpec("pink", "circle")


def test_score_two_matches_objects_to_requests():
    red = shapes.ShapeObject("circle", "red", 0.25, 0.5, 0.14)
    blue = shapes.ShapeObject("square", "blue", 0.75, 0.5, 0.14)
    found = render_objects(blue, red)  # drawing order must not matter
    asked = (ObjectSpec("red", "circle"), ObjectSpec("blue", "square"))
    assert score_two(found, Spec(asked, "left of")).all_correct
    assert score_two(found, Spec(asked[::-1], "right of")).all_correct
    wrong = score_two(found, Spec(asked, "right of"))
    assert wrong.both_present and wrong.relation is False and not wrong.all_correct
    either = score_two(found, Spec(asked, "and"))
    assert either.all_correct and either.relation is None
    missing = score_two(found, Spec((ObjectSpec("red", "circle"), ObjectSpec("green", "square")), "and"))
    assert not missing.both_present and not missing.all_correct and not missing.color and missing.shape


def test_prompt_set_counts_and_determinism():
    items = build_prompts(3)
    counts = {g: sum(i.group is g for i in items) for g in Group}
    assert counts == {Group.SEEN: 200, Group.HELD_OUT: 100, Group.UNSEEN_PHRASING: 100, Group.TWO_OBJECT: 200}
    assert [(i.prompt, i.seed) for i in items] == [(i.prompt, i.seed) for i in build_prompts(3)]
    assert [i.prompt for i in items] != [i.prompt for i in build_prompts(4)]
    small = build_prompts(3, seen=5, held_out=4, unseen_phrasing=3, two_object=2)
    groups = [Group.SEEN] * 5 + [Group.HELD_OUT] * 4 + [Group.UNSEEN_PHRASING] * 3 + [Group.TWO_OBJECT] * 2
    assert [i.group for i in small] == groups
    assert [i.prompt for i in small[:5]] == [i.prompt for i in items[:5]]  # groups don't shift each other
    with pytest.raises(ValueError, match="seen"):
        build_prompts(0, seen=-1)


def test_prompt_groups_ask_what_they_claim():
    items = build_prompts(0)
    for item in items:
        pairs = {(o.color, o.shape) for o in item.spec.objects}
        assert item.prompt == item.scene.caption
        if item.group is Group.HELD_OUT:
            assert pairs <= shapes.HELD_OUT_PAIRS and item.template in shapes.TRAIN_TEMPLATES
        else:
            assert not pairs & shapes.HELD_OUT_PAIRS
        if item.group is Group.SEEN:
            assert item.template in shapes.TRAIN_TEMPLATES
        if item.group is Group.UNSEEN_PHRASING:
            assert item.template in shapes.HELD_OUT_TEMPLATES
        if item.group is Group.TWO_OBJECT:
            assert len(item.spec.objects) == 2 and item.spec.relation in shapes.RELATIONS
        for obj in item.spec.objects:  # a size is asked only when the prompt says it
            assert obj.size is None or obj.size in item.prompt.split()
    assert {i.template for i in items if i.group is Group.UNSEEN_PHRASING} == set(shapes.HELD_OUT_TEMPLATES)
    for item in items:
        if item.group is Group.UNSEEN_PHRASING:
            assert not a_train_phrasing_could_say(item), item.prompt
    held_out = {(o.color, o.shape) for i in items if i.group is Group.HELD_OUT for o in i.spec.objects}
    assert held_out == shapes.HELD_OUT_PAIRS


def a_train_phrasing_could_say(item):
    obj = item.scene.objects[0]
    return any(
        shapes._tidy(t.format(size=size, color=obj.color, shape=obj.shape, pos=pos, Pos=pos)) == item.prompt
        for t in shapes.TRAIN_TEMPLATES for size in (obj.size, "")
        for pos in shapes.POSITION_PHRASES[obj.position] + ("",)
    )


@pytest.fixture(scope="module")
def items():
    return build_prompts(1, seen=60, held_out=30, unseen_phrasing=30, two_object=80)


def renderer(items, recolor=None, mirror=False):
    """A generate_fn that draws each prompt's ground-truth scene, optionally recoloured or mirrored."""
    scenes = {(i.prompt, i.seed): i.scene for i in items}

    def generate(prompts, seeds):
        images = []
        for prompt, seed in zip(prompts, seeds):
            scene = scenes[prompt, seed]
            objects = tuple(
                shapes.ShapeObject(o.shape, recolor.get(o.color, o.color) if recolor else o.color,
                                   1 - o.x if mirror else o.x, 1 - o.y if mirror else o.y, o.radius, o.position, o.size)
                for o in scene.objects
            )
            images.append(shapes.render(shapes.Scene(objects, scene.caption, background=scene.background), 32,
                                        color_jitter=12, seed=seed))
        return images

    return generate


def test_evaluate_reference_renders_all_correct(items, tmp_path):
    result = evaluate(renderer(items), items, batch_size=7)
    assert len(result.items) == len(items)
    assert set(result.groups) == set(Group)
    table = format_table(result)
    print("\n" + table)
    for group, rates in result.groups.items():
        assert rates.all_correct.value >= 0.98, (group, table)
    two = result.groups[Group.TWO_OBJECT]
    assert two.both_present.value >= 0.98 and two.relation.value >= 0.98 and two.relation.n < two.n
    assert result.groups[Group.SEEN].position.n > 0 and result.groups[Group.SEEN].both_present.n == 0
    assert "seen" in table and "100.0%" in table
    path = save_grid(result, tmp_path / "grid.png", cols=10)
    assert Image.open(path).width == 10 * 96


def test_evaluate_catches_wrong_generators(items, tmp_path):
    names = list(shapes.COLORS)
    shifted = {c: names[(k + 1) % len(names)] for k, c in enumerate(names)}
    wrong_color = evaluate(renderer(items, recolor=shifted), items)
    for group, rates in wrong_color.groups.items():
        assert rates.color.value == 0 and rates.all_correct.value == 0, group
        assert rates.shape.value >= 0.98, group
    labels = grid_labels(wrong_color)
    assert all(label.startswith(WRONG) for label in labels)
    mirrored = evaluate(renderer(items, mirror=True), [i for i in items if i.group is Group.TWO_OBJECT])
    two = mirrored.groups[Group.TWO_OBJECT]
    assert two.both_present.value >= 0.98 and two.relation.value == 0
    assert save_grid(mirrored, tmp_path / "wrong.png").exists()
    with pytest.raises(ValueError, match="returned 0 images"):
        evaluate(lambda prompts, seeds: [], items[:2])


# The shapes a LoRA can teach besides the star (issue 14's concept suite). Measured on these scenes:
# 100% on every attribute, clean and with noise, one and two objects; the thresholds are those of
# the base shapes above.
NEW_SHAPES = tuple(s for s in shapes.EXTRA_SHAPES if s != "star")


def extra_shape_scenes(shape, repeats):
    """Every colour x position x size of `shape`, `repeats` times each (jittered centre and radius)."""
    rng = random.Random(f"{shape}s")
    return [shapes.single_object_scene(rng, shape=shape, color=color, position=position, size=size)
            for color in shapes.COLORS for position in shapes.POSITIONS for size in shapes.SIZES
            for _ in range(repeats)]


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_judge_reads_new_shapes(shape):
    """Heart, cross, ring, crescent and diamond alone: every colour, position and size, 240 clean scenes
    and 120 with noise sigma 6/255; each attribute >= 98% right (measured 100%)."""
    assert set(NEW_SHAPES) >= {"heart", "cross", "ring", "crescent", "diamond"}
    for sigma, repeats in ((0.0, 4), (6.0, 2)):
        scenes = extra_shape_scenes(shape, repeats)
        assert len(scenes) == 60 * repeats and {s.objects[0].color for s in scenes} == set(shapes.COLORS)
        rates, read_as = single_object_rates(scenes, sigma)
        print(f"\n{shape}, noise sigma {sigma}/255 (n={len(scenes)}):",
              ", ".join(f"{k} {v:.2%}" for k, v in rates.items()), "read as", read_as)
        for name, rate in rates.items():
            assert rate >= 0.98, (shape, sigma, name, rates, read_as)


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_judge_reads_new_shapes_next_to_every_other_shape(shape):
    """Two-object scenes: the new shape with each other shape (base and extra), either order, all
    colours and layouts; both objects and the relation read right in >= 98% (measured 100%)."""
    colors = list(shapes.COLORS)
    others = [s for s in shapes.SHAPES + shapes.EXTRA_SHAPES if s != shape]
    rng = random.Random(f"{shape} pairs")
    right = scored = 0
    for k in range(6 * len(others)):
        new, other = (colors[k % 6], shape), (rng.choice(colors), others[k % len(others)])
        a, b = (new, other) if k % 2 == 0 else (other, new)
        scene = shapes.two_object_scene(rng, a=a, b=b)
        found = judge(shapes.render(scene, 32, color_jitter=12, seed=k))
        right += sorted((o.color, o.shape) for o in found.objects) == sorted([a, b])
        scored += score_two(found, Spec((ObjectSpec(*a), ObjectSpec(*b)), scene.relation)).all_correct
    n = 6 * len(others)
    print(f"\n{shape} with another shape (n={n}): both read right {right / n:.2%}, all-correct {scored / n:.2%}")
    assert right / n >= 0.98 and scored / n >= 0.98, (shape, right, scored, n)


def test_base_shapes_never_read_as_new_shapes():
    """Confusion check: circles, squares and triangles (held-out pairs too, one and two objects) are
    never read as a shape only a LoRA teaches, clean and with twice the noise of the tests above."""
    for sigma in (0.0, 12.0):
        read = {}
        for seed in range(1000, 1300):
            scene = ground_truth_scene(seed)
            image = shapes.render(scene, 32, color_jitter=12, seed=seed)
            for obj in judge(add_noise(image, sigma, seed) if sigma else image).objects:
                read[obj.shape] = read.get(obj.shape, 0) + 1
        print(f"\nbase scenes, noise sigma {sigma}/255, objects read as:", read)
        assert sum(read.values()) >= 400 and set(read) <= set(shapes.SHAPES), (sigma, read)


def test_new_shapes_at_other_sizes():
    for size in (64, 128):
        for shape in NEW_SHAPES:
            scene = extra_shape_scenes(shape, 1)[17]
            found = judge(shapes.render(scene, size, color_jitter=12))
            assert [(o.color, o.shape) for o in found.objects] == [(scene.objects[0].color, shape)], (size, shape)


def test_judge_candidates_narrow_what_a_shape_may_be_read_as():
    heart = shapes.single_object_scene(random.Random(3), shape="heart", color="red", size="large")
    image = shapes.render(heart, 32, color_jitter=12)
    assert [o.shape for o in judge(image).objects] == ["heart"]
    assert [o.shape for o in judge(image, candidates=["heart", "circle"]).objects] == ["heart"]
    only_base = judge(image, candidates=shapes.SHAPES).objects
    assert len(only_base) == 1 and only_base[0].shape in shapes.SHAPES and only_base[0].color == "red"
    assert only_base[0].shape_fit < judge(image).objects[0].shape_fit  # a worse fit than the heart's
    with pytest.raises(ValueError, match="unknown shape"):
        judge(image, candidates=["hexagon"])
    with pytest.raises(ValueError, match="empty"):
        judge(image, candidates=[])
