"""A buckets run: genkit-mini learns a concept from a folder of three aspect ratios, then draws it at each.

    python benchmarks/lora_buckets.py --out runs/lora-buckets            # 12 min on 2 cores shared with other jobs
    python benchmarks/lora_buckets.py --out runs/lora-buckets --compare  # also the same run without buckets (+18 min)

1. Data: the concept suite's star ("sks", trained in red and blue) drawn at 1:1 (64x64), 3:2 (96x64) and 2:3
   (64x96), 12 images each: every colour, size and position along the canvas's long axis (left, centre, right on a
   wide one; top, centre, bottom on a tall one), captions as the suite's ("a small red sks star on the left").
   The shapes keep their proportions and their size in pixels on every canvas (`shapes.render(..., height=)`).
2. `genkit data check` with genkit-mini's recipe: the buckets at 32 px the folder fills (32x32, 40x24, 24x40).
3. `genkit train lora` with genkit-mini's defaults (buckets on, as by default) but 400 steps (--steps) and no
   prior images (--set; what the priors keep of the base is the concept suite's to measure), to fit in 10 minutes.
4. Samples at each of those buckets' sizes: two prompts per colour (the two training colours and the four never
   shown with the star), one naming a position along the long axis; each judged by genkit.eval.judge, the sample
   padded to a square with its own background (the judge reads squares): the star found, in the asked colour, at
   the asked position; its shape fit (1 is a perfect star outline: a stretched or squashed star fits worse). The
   base model without the LoRA is the control. With --compare, a second LoRA trained on centre-cropped squares
   (data.buckets=false) is judged the same way.

Targets: at every aspect the star found in >= 80% of the prompts and the sample the bucket's shape; the control
finds no star. Measured (docs/lora.md): 100% at all three aspects with buckets, 58-75% at 3:2 and 2:3 without.
A rerun with the same --out reuses the trained LoRAs (`--retrain` trains again).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genkit.eval.concepts import TEMPLATES, Concept  # noqa: E402

CONCEPT = Concept("star", "sks", ("red", "blue"))
CANVASES = {"1:1": (64, 64), "3:2": (96, 64), "2:3": (64, 96)}  # drawn at twice the training size's side
ALONG = {"1:1": ("left", "center", "right"), "3:2": ("left", "center", "right"), "2:3": ("top", "center", "bottom")}


def make_dataset(folder: Path, per_aspect: int = 12, seed: int = 0) -> list[tuple[Path, str]]:
    """`per_aspect` images of the concept on each canvas, with .txt captions."""
    from genkit.data import shapes
    from genkit.eval.concepts import concept_scene
    from genkit.outputs import save_png, save_text

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"buckets-data-{seed}")
    written = []
    for aspect, (width, height) in CANVASES.items():
        for i in range(per_aspect):
            color = CONCEPT.colors[i % len(CONCEPT.colors)]
            k = i // len(CONCEPT.colors)
            scene = concept_scene(CONCEPT, rng, color, position=ALONG[aspect][k % 3],
                                  size=list(shapes.SIZES)[(k // 3) % 2], state_position=k % 4 != 3,
                                  template=TEMPLATES[i % len(TEMPLATES)])
            path = folder / f"{aspect.replace(':', 'x')}-{i:03d}.png"
            save_png(shapes.render(scene, width, height=height, color_jitter=12, seed=rng.randrange(2**31)), path)
            save_text(path.with_suffix(".txt"), scene.caption + "\n")
            written.append((path, scene.caption))
    return written


def prompts(aspect: str, seed: int = 0) -> list[dict]:
    """Two prompts per colour: one with a position along the canvas's long axis, one without."""
    from genkit.data import shapes
    from genkit.eval.concepts import concept_scene

    rng = random.Random(f"buckets-eval-{aspect}-{seed}")
    found = []
    for color in shapes.COLORS:
        for i in range(2):
            position = ALONG[aspect][rng.randrange(3)]
            scene = concept_scene(CONCEPT, rng, color, position=position, state_position=i == 0,
                                  template=TEMPLATES[(2 * len(found) + i) % len(TEMPLATES)])
            found.append({"prompt": scene.caption, "color": color, "position": position if i == 0 else None,
                          "seen_color": color in CONCEPT.colors, "seed": rng.randrange(2**31)})
    return found


def padded(image, fill=None):
    """The sample on a square of its own background (the judge reads squares), or of `fill`, and where it sits."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    side = max(width, height)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = Image.new("RGB", (side, side), fill or tuple(int(v) for v in np.median(border, axis=0)))
    left, top = (side - width) // 2, (side - height) // 2
    canvas.paste(image, (left, top))
    return canvas, (left, top, side)


def judge_samples(images, asked: list[dict]) -> list[dict]:
    from genkit.data import shapes
    from genkit.eval.concepts import candidates
    from genkit.eval.judge import judge

    rows = []
    for image, want in zip(images, asked):
        square, (left, top, side) = padded(image)
        found = [o for o in judge(square, candidates=candidates(CONCEPT)).objects if o.shape == CONCEPT.shape]
        star = found[0] if found else None
        row = {"prompt": want["prompt"], "size": list(image.size), "seen_color": want["seen_color"],
               "found": star is not None, "right_color": star is not None and star.color == want["color"],
               "shape_fit": star.shape_fit if star else None}
        if want["position"] is not None:
            at = None
            if star is not None:  # the star's centre as fractions of the sample, not of the padded square
                x, y = (star.center[0] * side - left) / image.size[0], (star.center[1] * side - top) / image.size[1]
                at = min(shapes.POSITIONS, key=lambda p: (shapes.POSITIONS[p][0] - x) ** 2 +
                         (shapes.POSITIONS[p][1] - y) ** 2)
            row["right_position"] = at == want["position"]
        rows.append(row)
    return rows


def figures(rows: list[dict]) -> dict:
    def rate(key, subset):
        subset = [r for r in subset if key in r]
        return sum(bool(r[key]) for r in subset) / len(subset) if subset else None

    fits = [r["shape_fit"] for r in rows if r["shape_fit"] is not None]
    seen = [r for r in rows if r["seen_color"]]
    unseen = [r for r in rows if not r["seen_color"]]
    return {"n": len(rows), "found": rate("found", rows), "found_seen": rate("found", seen),
            "found_unseen": rate("found", unseen),
            "right_color": rate("right_color", rows), "right_position": rate("right_position", rows),
            "shape_fit": sum(fits) / len(fits) if fits else None, "size": rows[0]["size"]}


def sample(pipeline, aspect: str, size: tuple[int, int], steps: int) -> tuple[list, list[dict]]:
    from genkit.generate import GenerationConfig
    from genkit.prompts import PromptSpec

    asked = prompts(aspect)
    config = GenerationConfig(width=size[0], height=size[1], num_inference_steps=steps, batch_size=len(asked))
    images = pipeline.generate([PromptSpec(a["prompt"], seed=a["seed"]) for a in asked], config).images
    return images, asked


def train(data: Path, out: Path, args, buckets: bool) -> dict:
    import genkit

    done = out / "training.json"
    if done.is_file() and not args.retrain:
        return json.loads(done.read_text())
    started = time.perf_counter()
    overrides = [f"train.steps={args.steps}", f"data.buckets={str(buckets).lower()}", *args.overrides]
    overrides += [f"train.threads={args.threads}"] if args.threads else []
    result = genkit.train_lora(data, out / "lora", overrides=overrides, progress=not args.quiet)
    record = json.loads(result.record.read_text())
    facts = {"seconds": round(time.perf_counter() - started, 1), "steps": args.steps, "overrides": overrides,
             "buckets": record["buckets"]}
    done.write_text(json.dumps(facts))
    return facts


def bucket_sizes() -> dict[str, tuple[int, int]]:
    """The bucket each canvas trains in with genkit-mini's recipe: the sizes to sample at."""
    from genkit.data.buckets import nearest
    from genkit.train.data_check import bucket_spec

    spec = bucket_spec(None)
    found = {aspect: nearest(*canvas, spec.buckets(spec.resolutions[0])) for aspect, canvas in CANVASES.items()}
    return {aspect: (bucket.width, bucket.height) for aspect, bucket in found.items()}


def bucket_check(data: Path) -> str:
    """`genkit data check DATA`'s bucket lines (genkit-mini's recipe)."""
    from genkit.data.imagefolder import check_dataset, format_report
    from genkit.train.data_check import bucket_spec

    report = check_dataset(data, buckets=bucket_spec(None))
    lines = format_report(report).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("buckets"))
    return "\n".join(lines[start:start + 1 + len(report.buckets)])


def evaluate(pipeline, sizes: dict, steps: int, grids: Path | None) -> dict:
    from genkit.grid import make_grid
    from genkit.outputs import save_png

    results = {}
    for aspect, size in sizes.items():
        images, asked = sample(pipeline, aspect, size, steps)
        results[aspect] = figures(judge_samples(images, asked))
        if grids is not None:
            squares = [padded(image, "white")[0] for image in images]  # square cells: each sample keeps its shape
            grid = make_grid(squares, [a["prompt"] for a in asked], cols=6, cell=96)
            save_png(grid, grids / f"samples-{aspect.replace(':', 'x')}.png")
    return results


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(rows: dict[str, dict]) -> str:
    from genkit.eval.report import text_table

    head = ("run", "aspect", "sample", "star found", "train col.", "unseen col.", "asked colour", "asked position",
            "shape fit")
    body = [(name, aspect, "x".join(map(str, f["size"])), pct(f["found"]), pct(f["found_seen"]), pct(f["found_unseen"]),
             pct(f["right_color"]), pct(f["right_position"]), "-" if f["shape_fit"] is None else
             f"{f['shape_fit']:.2f}")
            for name, result in rows.items() for aspect, f in result.items()]
    return text_table(head, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lora-buckets"))
    parser.add_argument("--steps", type=int, default=400, help="training steps (genkit-mini's default: 800)")
    parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                        help="recipe overrides (default: prior.source=none, so the run fits in 10 minutes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    parser.add_argument("--sample-steps", type=int, default=20, help="denoising steps per sample")
    parser.add_argument("--compare", action="store_true", help="also train and judge with data.buckets=false")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.overrides = ["prior.source=none"] if args.overrides is None else args.overrides
    import warnings

    import genkit
    from genkit import lora
    from genkit.prompts import UnknownWordsWarning

    warnings.simplefilter("ignore", UnknownWordsWarning)  # the control: the base model does not know the trigger word

    data = args.out / "data"
    if not data.is_dir():
        make_dataset(data)
    print(bucket_check(data), flush=True)
    runs = {"buckets": True} | ({"squares": False} if args.compare else {})
    trained = {name: train(data, args.out / name, args, on) for name, on in runs.items()}
    sizes = bucket_sizes()
    results = {"base (no LoRA)": evaluate(genkit.load(), sizes, args.sample_steps, None)}
    for name in runs:
        pipeline = genkit.load()
        lora.apply(pipeline, [lora.parse_spec(f"{args.out / name / 'lora'}:1.0")])
        (args.out / name).mkdir(parents=True, exist_ok=True)
        results[f"{name} LoRA"] = evaluate(pipeline, sizes, args.sample_steps, args.out / name)
    for name, facts in trained.items():
        print(f"{name}: {facts['steps']} steps in {facts['seconds'] / 60:.1f} min, buckets {facts['buckets']}")
    print(table(results))
    (args.out / "results.json").write_text(json.dumps({"training": trained, "judged": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
