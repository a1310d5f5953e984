"""The concept suite's pieces (genkit.eval.concepts): data, prompts, and judging on rendered ground truth."""

import random

from genkit.data import shapes
from genkit.eval.concepts import Concept, concept_figures, concept_prompts, judge_concept, make_dataset

STAR = Concept("star", "sks", ("red", "blue"))


def test_the_dataset_shows_the_concept_in_its_colours_with_the_trigger_word(tmp_path):
    made = make_dataset(STAR, tmp_path, n=12)
    assert len(made) == 12 and all(path.is_file() and path.with_suffix(".txt").is_file() for path, _ in made)
    assert all(" sks star" in caption for _, caption in made)
    assert {c for _, caption in made for c in shapes.COLORS if f"{c} sks" in caption} == {"red", "blue"}


def test_prompts_ask_every_colour_and_know_which_were_trained():
    prompts = concept_prompts(STAR, per_color=3)
    assert len(prompts) == 3 * len(shapes.COLORS)
    assert {p.color for p in prompts if p.seen_color} == {"red", "blue"}
    assert all(" sks star" in p.prompt and p.color in p.prompt for p in prompts)


def test_judging_the_ground_truth_finds_the_concept():
    """Images drawn by the renderer itself for each prompt: the scoring path must find every star in its colour."""
    prompts = concept_prompts(STAR, per_color=4)

    def truth(texts, seeds):
        out = []
        for text, seed in zip(texts, seeds):
            item = next(p for p in prompts if p.prompt == text and p.seed == seed)
            obj = item.spec.objects[0]
            scene = shapes.single_object_scene(random.Random(seed), color=obj.color, shape="star",
                                               position=obj.position or None)
            out.append(shapes.render(scene, 32, seed=seed))
        return out

    result = judge_concept(STAR, truth, prompts)
    figures = result["figures"]
    assert figures["overall"]["n"] == len(prompts)
    assert figures["overall"]["found"] >= 0.95 and figures["overall"]["right_color"] >= 0.95
    assert concept_figures([])["overall"] == {"n": 0, "found": None, "right_color": None, "all_correct": None}
