"""Teach genkit-mini a shape it has never seen, a five-pointed star, with the default LoRA recipe.

    python examples/lora_star.py --out runs/lora-star        # ~10 min training on 2 cores + ~1 min of images

What a person does with their own folder, step by step:

1. Data, OUT/data: 32 images of a star (genkit's shapes world draws it; genkit-mini's training never
   did) in two colours only, red and blue, every position and both sizes, each with a .txt caption
   that names it with a trigger word: "a red sks star on the left".
2. Training: `genkit.train_lora(OUT/data, OUT/lora)`, the same as
   `genkit train lora OUT/data --out OUT/lora`: no config and no overrides. The defaults for
   genkit-mini (configs/lora.toml) include prior preservation: 720 scenes of its own world, drawn
   into OUT/lora/priors, fill a quarter of every batch, trained toward the base model's own
   prediction on them.
3. Images: star prompts in all six colours, four never shown with a star, without and with the
   LoRA; OUT/star_grid.png (the README's picture: wrong ones marked "x" with what the judge saw) and
   OUT/star_grid_base.png, and the share of images in which the judge finds a star (OUT/star_figures.json).

The measured figures and their targets are benchmarks/lora_concepts.py's (this star is one of its
concepts, the same data); a rerun with the same OUT reuses the trained LoRA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genkit.eval.concepts import Concept  # noqa: E402

STAR = Concept("star", "sks", ("red", "blue"))


def make_data(folder: Path) -> None:
    from genkit.eval.concepts import make_dataset

    if not folder.is_dir():
        make_dataset(STAR, folder)


def train(data: Path, out: Path, *, model=None, overrides=(), progress: bool = True) -> float | None:
    """Train with the defaults (`overrides` only for tests); seconds taken, or None when OUT already holds it."""
    import genkit

    if (out / "pytorch_lora_weights.safetensors").is_file():
        return None
    started = time.perf_counter()
    genkit.train_lora(data, out, model=model, overrides=overrides, progress=progress)
    return time.perf_counter() - started


def star_images(lora_dir: Path | None, *, model=None, per_color: int = 4, settings=None) -> dict:
    """Star prompts in every colour through the engine (with the LoRA at scale 1 when given), judged."""
    import genkit
    from genkit import lora
    from genkit.eval.concepts import concept_prompts, generate_fn, judge_concept
    from genkit.generate import GenerationConfig

    pipeline = genkit.load(model)
    if lora_dir is not None:
        lora.apply(pipeline, [lora.parse_spec(f"{lora_dir}:1.0")])
    config = GenerationConfig(batch_size=60, **(settings or {}))
    return judge_concept(STAR, generate_fn(pipeline, config), concept_prompts(STAR, per_color))


def save_grid(result: dict, path: Path, per_color: int) -> None:
    from genkit.grid import make_grid

    labels = [r["prompt"] if r["found"] and r["right_color"] else f"x {r['prompt']} | saw {', '.join(r['saw']) or 'nothing'}"
              for r in result["rows"]]
    make_grid(result["images"], labels, cols=per_color, cell=96, label_lines=4).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lora-star"))
    parser.add_argument("--model", default=None, help="base model (default: the shipped genkit-mini)")
    parser.add_argument("--per-color", type=int, default=4, help="star prompts per colour in the grids")
    args = parser.parse_args(argv)
    make_data(args.out / "data")
    seconds = train(args.out / "data", args.out / "lora", model=args.model)
    if seconds is not None:
        print(f"trained in {seconds / 60:.1f} min: {args.out / 'lora'}")
    summary = {}
    for name, lora_dir in (("star_grid_base", None), ("star_grid", args.out / "lora")):
        result = star_images(lora_dir, model=args.model, per_color=args.per_color)
        save_grid(result, args.out / f"{name}.png", args.per_color)
        figures = result["figures"]
        summary[name] = figures
        print(f"{'with the LoRA' if lora_dir else 'base model   '}: star found in {figures['overall']['found']:.0%} "
              f"(training colours {figures['seen_colors']['found']:.0%}, unseen {figures['unseen_colors']['found']:.0%}), "
              f"asked colour {figures['overall']['right_color']:.0%}; {args.out / name}.png")
    (args.out / "star_figures.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
