"""Teach genkit-mini a shape it has never seen, a five-pointed star, with a LoRA (issue 4).

    python examples/lora_star.py --out runs/lora-star

1. Data, in OUT/data (PNG + same-stem .txt caption):
   - 36 images of the star drawn by genkit's own shapes world (`shapes.EXTRA_SHAPES`, never in
     genkit-mini's training scenes), in two colours only (red and blue), every position and both
     sizes, captioned with a trigger word in a few of the training phrasings, e.g.
     "a red sks star on the left" (folder `20_star`, see below);
   - 720 prior-preservation images (DreamBooth's "class images"): scenes from genkit-mini's own
     training distribution (`shapes.random_scene`: circles, squares and triangles, never a star,
     never a held-out pair) with their captions, rendered by the shapes world in no time. They add
     nothing about stars; they keep the LoRA from drifting on the prompts the base model already
     handles (72 of them were memorised: the standard set fell 6.3 points, 720: 2.2). The star
     images sit in a kohya-style folder `20_star`, each listed 20 times, so about half of every
     batch is a star. `--prior 0` trains on the 36 star images alone; `--prior-source model` uses
     the base model's own generations for the prior captions instead of renders (measured: about
     twice the drift of renders, see configs/lora-star.toml).
2. Training: a LoRA on the base model with `configs/lora-star.toml` into OUT/lora; the measured
   wall time is printed and recorded (the recipe is sized for <= 10 minutes on 2 idle CPU cores).
3. Evaluation, at the model's default generation settings, LoRA scale 1:
   - star prompts in all six colours (10 each, half with a position): the share in which the judge
     finds a star, overall, for the two training colours and for the four never shown with a star;
     also a star of the asked colour, and all-correct as the standard set scores it. The same
     prompts without the LoRA are the control;
   - the standard prompt set (`genkit eval`'s) without and with the LoRA: all-correct per group
     and overall, and the drop in points.
4. Output: OUT/star_grid.png (star prompts with the LoRA, a row per colour, each prompt under its
   image, wrong ones marked "x" with what the judge saw), OUT/star_grid_base.png (the same prompts
   without the LoRA), OUT/standard_grid_lora.png, OUT/results.json (every figure), OUT/table.txt
   (the printed table).

A rerun with the same OUT reuses the trained LoRA (and the recorded training time) and only
re-evaluates; `--retrain` trains again. `--quick` shrinks the standard set for a fast look; the
figures reported for issue 4 use the full set (the default, 200/100/100/200 as `genkit eval`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "lora-star.toml"
TRIGGER = "sks"
TRAIN_COLORS = ("red", "blue")
# Training phrasings of the star captions (a subset of shapes.TRAIN_TEMPLATES); the star prompts use them too.
TEMPLATES = (
    "a {size} {color} {shape} {pos}",
    "{color} {shape}, {pos}",
    "an image of a {size} {color} {shape} {pos}",
    "a picture showing a {color} {shape} {pos}",
)
STANDARD = {"seen": 200, "held_out": 100, "unseen_phrasing": 100, "two_object": 200}  # genkit eval's defaults
PRIOR_IMAGES = 720  # prior-preservation images mixed into training (see make_prior; 72 drifted 6.3 points)
QUICK = {"seen": 40, "held_out": 20, "unseen_phrasing": 20, "two_object": 40}
TARGET_FOUND, TARGET_DROP = 0.80, 5.0  # issue 4: stars found in >= 80% of star prompts; base all-correct drop <= 5 points


# --- 1. Data --------------------------------------------------------------------------------


def star_scene(rng: random.Random, color: str, *, position=None, size=None, state_position=None, template=None,
               trigger: str = TRIGGER):
    """A shapes-world star scene whose caption names the star with the trigger word ("a red sks star ...")."""
    from dataclasses import replace

    from genkit.data import shapes

    scene = shapes.single_object_scene(rng, color=color, shape="star", position=position, size=size,
                                       state_position=state_position, template=template)
    return replace(scene, caption=re.sub(r"\bstar\b", f"{trigger} star", scene.caption))


def make_dataset(folder, *, n: int = 36, colors=TRAIN_COLORS, trigger: str = TRIGGER, resolution: int = 32,
                 seed: int = 0) -> list[tuple[Path, str]]:
    """`n` star images in `colors`, each position and size in turn, with .txt captions: [(png, caption)]."""
    from genkit.data import shapes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"lora-star-data-{seed}")
    positions, sizes = list(shapes.POSITIONS), list(shapes.SIZES)
    written = []
    for i in range(n):
        color = colors[i % len(colors)]
        k = i // len(colors)  # per colour: every position x size once, then again
        scene = star_scene(rng, color, position=positions[k % len(positions)], size=sizes[(k // len(positions)) % 2],
                           state_position=k % 4 != 3, template=TEMPLATES[i % len(TEMPLATES)], trigger=trigger)
        image = shapes.render(scene, resolution, color_jitter=12, seed=rng.randrange(2**31))
        path = folder / f"star-{i:03d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(scene.caption + "\n")
        written.append((path, scene.caption))
    return written


def make_prior(folder, *, n: int, model=None, source: str = "render", resolution: int = 32, seed: int = 0,
               batch_size: int = 50, settings=None, device=None) -> list[tuple[Path, str]]:
    """Prior-preservation images: `n` scenes from genkit-mini's own training distribution
    (`shapes.random_scene`, so circles, squares and triangles only, never a star) with their captions, drawn
    by the shapes world (`source="render"`, the default: the data the base model was trained on, whose loss
    it already minimises, so they pull the LoRA back to the base wherever it strays) or generated by the
    frozen base model itself (`source="model"`, DreamBooth's recipe; its guided samples are not the model's
    conditional distribution, so fitting them moves the model)."""
    from genkit.data import shapes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the training distribution itself (base training drew its seeds from 0..2**62, so not scenes it saw)
    scenes = [shapes.random_scene(10**6 + seed * 10**4 + i) for i in range(n)]
    if source == "render":
        images = [shapes.render(scene, resolution, color_jitter=12, seed=i) for i, scene in enumerate(scenes)]
    elif source == "model":
        import genkit
        from genkit.generate import GenerationConfig

        pipeline = genkit.load(model, device=device)
        config = GenerationConfig(batch_size=batch_size, **{k: v for k, v in (settings or {}).items() if v is not None})
        images = generate_fn(pipeline, config)([s.caption for s in scenes], [7_000_000 + i for i in range(n)]) if n else []
    else:
        raise ValueError(f"prior source must be model or render, got {source!r}")
    written = []
    for i, (scene, image) in enumerate(zip(scenes, images)):
        path = folder / f"prior-{i:03d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(scene.caption + "\n")
        written.append((path, scene.caption))
    return written


# --- 2. Training ----------------------------------------------------------------------------


def train(data, out, *, model=None, config=RECIPE, overrides=(), progress=True) -> dict:
    """Train the LoRA into `out`; returns the run's facts, wall time included."""
    import torch

    import genkit

    started = time.perf_counter()
    result = genkit.train_lora(data, out, model=model, config=config, overrides=list(overrides), progress=progress)
    seconds = time.perf_counter() - started
    lines = [json.loads(line) for line in (Path(out) / "loss.jsonl").read_text().splitlines() if line]
    facts = {"seconds": round(seconds, 1), "loop_seconds": lines[-1]["time"] if lines else None,
             "steps": result.steps, "final_loss": result.loss, "threads": torch.get_num_threads(),
             "weights": str(result.weights)}
    (Path(out) / "train_time.json").write_text(json.dumps(facts, indent=1))
    return facts


# --- 3. Evaluation --------------------------------------------------------------------------


@dataclass(frozen=True)
class StarPrompt:
    prompt: str
    color: str
    seen_color: bool  # one of the training colours
    spec: object  # genkit.eval.judge.Spec: what the prompt asks for
    seed: int


def star_prompts(per_color: int = 10, *, trigger: str = TRIGGER, train_colors=TRAIN_COLORS,
                 seed: int = 0) -> list[StarPrompt]:
    """`per_color` star prompts for each of the six colours, alternately with and without a position."""
    from genkit.data import shapes
    from genkit.eval.judge import Spec

    rng = random.Random(f"lora-star-eval-{seed}")
    prompts = []
    for color in shapes.COLORS:
        for i in range(per_color):
            scene = star_scene(rng, color, state_position=i % 2 == 0, template=TEMPLATES[i % len(TEMPLATES)],
                               trigger=trigger)
            prompts.append(StarPrompt(scene.caption, color, color in train_colors, Spec.from_scene(scene),
                                      rng.randrange(2**31)))
    return prompts


def generate_fn(pipeline, config):
    from genkit.prompts import PromptSpec

    def generate(prompts, seeds):
        return pipeline.generate([PromptSpec(p, seed=s) for p, s in zip(prompts, seeds)], config).images

    return generate


def judge_stars(generate, prompts: list[StarPrompt], batch_size: int = 60) -> dict:
    """Generate and judge every star prompt: {"rows": per prompt, "images": [...], "figures": rates}."""
    from genkit.eval.judge import judge, score_single

    rows, images = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for item, image in zip(batch, generate([p.prompt for p in batch], [p.seed for p in batch])):
            found = judge(image)
            rows.append({
                "prompt": item.prompt, "seed": item.seed, "color": item.color, "seen_color": item.seen_color,
                "star_found": any(o.shape == "star" for o in found.objects),
                "star_color": bool(found.find(item.color, "star")),
                "all_correct": score_single(found, item.spec).all_correct,
                "saw": [f"{o.color} {o.shape}" for o in found.objects],
            })
            images.append(image)
    return {"rows": rows, "images": images, "figures": star_figures(rows)}


def star_figures(rows: list[dict]) -> dict:
    """Rates of star found / star of the asked colour / all-correct: overall, seen and unseen colours, per colour."""
    def rates(subset):
        n = len(subset)
        return {"n": n} | {key: (sum(r[key] for r in subset) / n if n else None)
                           for key in ("star_found", "star_color", "all_correct")}

    colors = sorted({r["color"] for r in rows}, key=[r["color"] for r in rows].index)
    return {"overall": rates(rows), "seen_colors": rates([r for r in rows if r["seen_color"]]),
            "unseen_colors": rates([r for r in rows if not r["seen_color"]]),
            "per_color": {c: rates([r for r in rows if r["color"] == c]) for c in colors}}


def star_grid(result: dict, path, *, cols: int | None = None):
    """The star prompts' images, one row per colour, each prompt under its image; wrong ones marked "x"."""
    from genkit.grid import make_grid

    cols = cols or max(1, len(result["rows"]) // len({r["color"] for r in result["rows"]}))
    labels = [r["prompt"] if r["star_color"] else f"x {r['prompt']} | saw {', '.join(r['saw']) or 'nothing'}"
              for r in result["rows"]]
    path = Path(path)
    make_grid(result["images"], labels, cols=cols, cell=96, label_lines=4).save(path)
    return path


def standard_eval(generate, counts: dict, *, seed: int = 0, batch_size: int = 50):
    """genkit eval's prompt set; returns (EvalResult, {group: all-correct, "overall": pooled all-correct})."""
    from genkit.eval.prompts import build_prompts
    from genkit.eval.report import evaluate

    result = evaluate(generate, build_prompts(seed, **counts), batch_size=batch_size)
    all_correct = {g.value: r.all_correct.value for g, r in result.groups.items()}
    all_correct["overall"] = sum(r.score.all_correct for r in result.items) / len(result.items)
    return result, all_correct


def drop_points(before: dict, after: dict) -> dict:
    """All-correct drop in percentage points (positive = worse with the LoRA), per group and overall."""
    return {k: round(100 * (before[k] - after[k]), 2) for k in before if before[k] is not None}


def evaluate_lora(model, lora_dir, *, per_color: int = 10, counts=None, seed: int = 0, batch_size: int = 50,
                  device=None, settings=None, progress=True) -> dict:
    """Star prompts and the standard set, without and then with the LoRA at scale 1, on one loaded pipeline."""
    import genkit
    from genkit import lora
    from genkit.generate import GenerationConfig

    counts = dict(STANDARD if counts is None else counts)
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    config = GenerationConfig(batch_size=batch_size, **settings)
    pipeline = genkit.load(model, device=device)
    say = print if progress else (lambda *a, **k: None)
    prompts = star_prompts(per_color, seed=seed)
    timings = {}

    def timed(name, fn, *args, **kwargs):
        started = time.perf_counter()
        say(f"  {name} ...", flush=True)
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - started, 1)
        return value

    base = timed("star prompts, no LoRA", judge_stars, generate_fn(pipeline, config), prompts, batch_size)
    standard_base = timed("standard set, no LoRA", standard_eval, generate_fn(pipeline, config), counts,
                          seed=seed, batch_size=batch_size) if sum(counts.values()) else None
    lora.apply(pipeline, [lora.parse_spec(f"{lora_dir}:1.0")])
    stars = timed("star prompts, LoRA", judge_stars, generate_fn(pipeline, config), prompts, batch_size)
    standard_lora = timed("standard set, LoRA", standard_eval, generate_fn(pipeline, config), counts,
                          seed=seed, batch_size=batch_size) if sum(counts.values()) else None
    record = pipeline.record(pipeline.plan(["x"], config)[0])
    figures = {
        "settings": {k: record.get(k) for k in ("model", "num_inference_steps", "guidance_scale", "scheduler",
                                                  "width", "height", "lora", "dtype")},
        "star": {"with_lora": stars["figures"], "without_lora": base["figures"], "prompts": per_color * 6},
        "eval_seconds": timings,
    }
    if standard_base is not None:
        figures["standard"] = {
            "counts": counts, "seed": seed,
            "all_correct_without_lora": standard_base[1], "all_correct_with_lora": standard_lora[1],
            "drop_points": drop_points(standard_base[1], standard_lora[1]),
            "without_lora": standard_base[0].as_dict(), "with_lora": standard_lora[0].as_dict(),
        }
    return {"figures": figures, "stars": stars, "stars_base": base,
            "standard": (standard_base[0], standard_lora[0]) if standard_base else None}


# --- 4. Report ------------------------------------------------------------------------------


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_tables(figures: dict) -> str:
    lines = []
    training = figures.get("training")
    if training:
        lines.append(f"training: {training.get('star_images', '?')} star images + {training.get('prior_images', 0)} "
                     f"prior images; {training['steps']} steps in {training['seconds']:.0f} s "
                     f"({training['seconds'] / 60:.1f} min; loop {training['loop_seconds']} s) on "
                     f"{training['threads']} thread(s); prior images took {training.get('prior_seconds', 0):.0f} s")
    star = figures["star"]
    lines.append("")
    lines.append(f"star prompts (trigger word '{TRIGGER}'; training colours {', '.join(TRAIN_COLORS)}):")
    rows = [["", "n", "star found", "star, right colour", "all-correct", "star found, no LoRA"]]
    for key, name in (("overall", "all colours"), ("seen_colors", "training colours"),
                      ("unseen_colors", "unseen colours")):
        w, b = star["with_lora"][key], star["without_lora"][key]
        rows.append([name, str(w["n"]), pct(w["star_found"]), pct(w["star_color"]), pct(w["all_correct"]),
                     pct(b["star_found"])])
    for color, w in star["with_lora"]["per_color"].items():
        b = star["without_lora"]["per_color"][color]
        rows.append([f"  {color}", str(w["n"]), pct(w["star_found"]), pct(w["star_color"]), pct(w["all_correct"]),
                     pct(b["star_found"])])
    lines += _table(rows)
    standard = figures.get("standard")
    if standard:
        lines.append("")
        lines.append("standard prompt set, all-correct (" + ", ".join(f"{k} {v}" for k, v in standard["counts"].items())
                     + "):")
        rows = [["group", "no LoRA", "LoRA", "drop (points)"]]
        for group, before in standard["all_correct_without_lora"].items():
            after = standard["all_correct_with_lora"][group]
            rows.append([group, pct(before), pct(after), f"{standard['drop_points'].get(group, 0):+.1f}"])
        lines += _table(rows)
    checks = figures.get("checks")
    if checks:
        lines.append("")
        lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks.items()]
    return "\n".join(lines)


def _table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    out.insert(1, "-" * len(out[0]))
    return out


def checks(figures: dict) -> dict:
    star = figures["star"]["with_lora"]
    result = {
        f"stars found in >= {TARGET_FOUND:.0%} of star prompts ({pct(star['overall']['star_found'])})":
            star["overall"]["star_found"] >= TARGET_FOUND,
        f"... and of those in unseen colours ({pct(star['unseen_colors']['star_found'])})":
            star["unseen_colors"]["star_found"] >= TARGET_FOUND,
    }
    standard = figures.get("standard")
    if standard:
        drop = standard["drop_points"]["overall"]
        result[f"standard all-correct drops <= {TARGET_DROP:g} points ({drop:+.1f})"] = drop <= TARGET_DROP
    training = figures.get("training")
    if training:
        total = training["seconds"] + training.get("prior_seconds", 0)
        result[f"training (with its prior images) <= 10 minutes ({total / 60:.1f} min)"] = total <= 600
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora-star", help="folder for data, LoRA, grid and results")
    parser.add_argument("--model", default=None, help="base model (default: the shipped genkit-mini)")
    parser.add_argument("--config", default=str(RECIPE), help="LoRA recipe (default configs/lora-star.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set train.steps=20 (repeatable)")
    parser.add_argument("--images", type=int, default=36, help="star training images (default 36)")
    parser.add_argument("--prior", type=int, default=PRIOR_IMAGES,
                        help=f"prior-preservation images of the base shapes (default {PRIOR_IMAGES}; 0: none)")
    parser.add_argument("--prior-source", choices=("render", "model"), default="render",
                        help="prior images rendered by the shapes world (default) or generated by the base model")
    parser.add_argument("--per-color", type=int, default=10, help="star prompts per colour (default 10)")
    parser.add_argument("--quick", action="store_true", help="a small standard set (40/20/20/40) instead of 200/100/100/200")
    parser.add_argument("--standard", type=int, nargs=4, metavar=("SEEN", "HELD_OUT", "UNSEEN_PHRASING", "TWO_OBJECT"),
                        help="standard-set counts per group (0 0 0 0 skips it)")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per generation batch")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--scheduler", default=None, help="scheduler (default: the model's)")
    parser.add_argument("--retrain", action="store_true", help="train again even if OUT/lora holds a LoRA")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.per_color < 1 or args.images < 1 or args.prior < 0:
        parser.error("--per-color and --images must be at least 1 and --prior at least 0")

    from genkit.train.lora import WEIGHTS_NAME

    out = Path(args.out)
    data, lora_dir = out / "data", out / "lora"
    counts = dict(zip(STANDARD, args.standard)) if args.standard else dict(QUICK if args.quick else STANDARD)
    settings = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "scheduler": args.scheduler}

    # 1-2. data and training, unless OUT/lora already holds this run's LoRA
    if args.retrain and lora_dir.exists():
        shutil.rmtree(lora_dir)
    if (lora_dir / WEIGHTS_NAME).exists() and (lora_dir / "train_time.json").exists():
        training = json.loads((lora_dir / "train_time.json").read_text())
        print(f"training: reusing the LoRA in {lora_dir} (trained in {training['seconds']:.0f} s; --retrain to redo)")
    else:
        if lora_dir.exists():  # an interrupted run: start over, so the recorded time is one unbroken run's
            print(f"training: {lora_dir} holds no finished LoRA; training from scratch")
            shutil.rmtree(lora_dir)
        if data.exists():
            shutil.rmtree(data)  # exactly the images this run describes
        # with prior images, a kohya-style folder "<repeats>_star" lists each star image `repeats` times, so about
        # half of every batch is a star (the .txt captions still name each image)
        repeats = max(1, round(args.prior / args.images)) if args.prior else 1
        star_dir = data / (f"{repeats}_star" if args.prior else "star")
        written = make_dataset(star_dir, n=args.images)
        print(f"data: {len(written)} star images in {', '.join(TRAIN_COLORS)} -> {star_dir}  "
              f"(e.g. \"{written[0][1]}\")", flush=True)
        started = time.perf_counter()
        prior = make_prior(data / "prior", n=args.prior, model=args.model, source=args.prior_source,
                           batch_size=args.batch_size, settings=settings)
        prior_seconds = round(time.perf_counter() - started, 1)
        if prior:
            print(f"data: {len(prior)} prior-preservation images of base shapes ({args.prior_source}, "
                  f"{prior_seconds:.0f} s) -> {data / 'prior'}", flush=True)
        print(f"training: {args.config} {' '.join(args.overrides)} -> {lora_dir}", flush=True)
        training = train(data, lora_dir, model=args.model, config=args.config, overrides=args.overrides,
                         progress=not args.no_progress)
        training |= {"prior_seconds": prior_seconds, "star_images": len(written), "prior_images": len(prior),
                     "prior_source": args.prior_source, "colors": list(TRAIN_COLORS), "trigger": TRIGGER,
                     "captions": sorted({c for _, c in written})}
        (lora_dir / "train_time.json").write_text(json.dumps(training, indent=1))
        print(f"training took {training['seconds']:.1f} s ({training['seconds'] / 60:.2f} min) for "
              f"{training['steps']} steps on {training['threads']} thread(s)", flush=True)

    # 3. evaluation
    print("evaluating (no LoRA, then the LoRA at scale 1):", flush=True)
    evaluation = evaluate_lora(args.model, lora_dir, per_color=args.per_color, counts=counts, seed=args.seed,
                               batch_size=args.batch_size, progress=not args.no_progress, settings=settings)
    figures = {"training": training, **evaluation["figures"]}
    figures["checks"] = checks(figures)

    # 4. report
    grid = star_grid(evaluation["stars"], out / "star_grid.png")
    star_grid(evaluation["stars_base"], out / "star_grid_base.png")
    if evaluation["standard"]:
        from genkit.eval.report import save_grid

        save_grid(evaluation["standard"][1], out / "standard_grid_lora.png")
    figures["star"]["rows_with_lora"] = evaluation["stars"]["rows"]
    (out / "results.json").write_text(json.dumps(figures, indent=1))
    table = format_tables(figures)
    (out / "table.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"\ngrid: {grid}\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
