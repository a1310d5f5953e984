"""Image-to-image, inpainting and outpainting on the shipped genkit-mini, measured with the judge.

    python benchmarks/edit_mini.py                     # ~100 scenes per task; tables to stdout
    python benchmarks/edit_mini.py --scenes 20 --quick # a smoke run
    python benchmarks/edit_mini.py --picture docs/edit-mini.png

Every image is made as genkit's engine makes it: the preset's sampler (DPM++ 2M, fresh for each
batch), 20 steps, guidance 4, a CPU generator per image seeded with its scene number, and the call
inside `BatchInvariant` / `rows_apart`, so an image does not depend on the batch it ran in.

1. img2img. One-object scenes (`shapes.single_object_scene`, position stated) are rendered at 32x32;
   the prompt asks for the same shape at the same position in another colour ("a blue circle on
   the left" for a red circle on the left). Per strength: the mean absolute pixel distance to the
   input (0-255 levels), and how often the judge finds the asked colour, the original shape and the
   original position (and all three, and that with exactly one object: the judge's all-correct).
   Strength 1.0 is also compared pixel for pixel with text-to-image of the same prompt and seed.
2. inpainting. A two-object scene laid out left/right (`shapes.two_object_scene`) is rendered with
   only one of its objects; the other half of the canvas is masked (white) and the prompt names both
   objects and their relation ("a red circle to the left of a blue square"). Reported: the largest
   difference outside the mask (must be 0), the judge's verdict on both objects and the relation, and
   whether the asked object was drawn inside the masked half; per way of re-imposing the known region
   (`GenkitMiniPipeline.inpaint_noise`) and strength, with text-to-image of the same prompts as a reference.
3. inpainting, replace one object: a two-object scene (any relation) with a square box around one
   object masked; the prompt asks for another colour-shape pair in its place. Harder than the half
   masks: the model must draw the object inside the box, at the box's size. Reported: the max
   difference outside the mask, the judge's verdict on both objects and the relation, whether the asked
   object's centre lies in the box, and whether exactly two objects are seen (no leftover, no extra).
4. outpainting. The same one-object 32x32 inputs, the object on the side away from the extension,
   are extended by 16 pixels (`genkit.images.outpaint`) to 48x32, and the prompt asks for the second
   object in the new strip. The judge reads square images of any size, so the 48x32 output is
   letterboxed to 48x48 (8 rows above and below in the median colour of the output's border; no
   resizing, which would turn circles into ellipses). Reported per fill and strength: the largest
   difference on the original 32x32 region (must be 0), the judge's verdict on both objects and the
   relation, and whether the asked object lies in the new strip.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import genkit  # noqa: E402
from genkit import images as readers  # noqa: E402
from genkit import schedulers  # noqa: E402
from genkit.data import shapes  # noqa: E402
from genkit.eval.judge import ObjectSpec, Spec, judge, score  # noqa: E402
from genkit.invariance import BatchInvariant, rows_apart  # noqa: E402

SIZE = 32
EXTEND = 16
SIDE_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the center"}
REL_PHRASE = {"left of": "to the left of", "right of": "to the right of"}
INPAINT_VARIANTS = "fixed:1,fresh:1,none:1,fixed+r2:1,fresh+r2:1,fixed:0.8,fresh:0.8"
BOX_VARIANTS = "fixed:1,fresh:1,none:1,fixed+r2:1,fresh+r2:1,fixed:0.8"
OUTPAINT_VARIANTS = "mean/fixed:1,edge/fixed:1,mean/fixed:0.8,edge/fixed:0.8"


# --- running the model --------------------------------------------------------------------


class Runner:
    def __init__(self, steps: int, guidance: float, batch_size: int, scheduler: str):
        self.model = genkit.load(device="cpu")
        self.pipe = self.model.pipe
        self.steps, self.guidance, self.batch_size, self.scheduler = steps, guidance, batch_size, scheduler
        self.images = 0
        self.defaults = (self.pipe.inpaint_noise, self.pipe.inpaint_resample)
        # the pipeline's own way, in the notation of `inpaint_noise` below
        self.default_method = self.defaults[0] + (f"+r{self.defaults[1]}" if self.defaults[1] > 1 else "")

    def __call__(self, prompts, seeds, *, image=None, mask_image=None, strength=None, inpaint_noise=None):
        """One image per prompt; `image` and `mask_image` are lists (one per prompt) or None.

        `inpaint_noise` is GenkitMiniPipeline.inpaint_noise, optionally with "+rN": N passes per step
        (RePaint's resampling, `inpaint_resample`)."""
        out = []
        noise, _, passes = (inpaint_noise or self.default_method).partition("+r")
        self.pipe.inpaint_noise, self.pipe.inpaint_resample = noise, int(passes or 1)
        for start in range(0, len(prompts), self.batch_size):
            part = slice(start, start + self.batch_size)
            self.pipe.scheduler = schedulers.build(self.scheduler, self.model.base_scheduler_config)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[part]]
            extra = {}
            if image is not None:
                extra = dict(image=image[part], strength=strength)
                if mask_image is not None:
                    extra["mask_image"] = mask_image[part]
            with BatchInvariant(), rows_apart(self.pipe.text_encoder):
                result = self.pipe(prompts[part], generator=generators, num_inference_steps=self.steps,
                                   guidance_scale=self.guidance, **extra)
            out += result.images
            self.images += len(result.images)
        self.pipe.inpaint_noise, self.pipe.inpaint_resample = self.defaults
        return out


# --- scenes ---------------------------------------------------------------------------------


def recolor_cases(n: int, seed: int):
    """(input image, prompt, spec asked, original object) for img2img."""
    cases = []
    for k in range(n):
        rng = random.Random(seed * 100_003 + k)
        scene = shapes.single_object_scene(rng, state_position=True)
        obj = scene.objects[0]
        target = rng.choice([c for c in shapes.COLORS if c != obj.color and (c, obj.shape) not in shapes.HELD_OUT_PAIRS])
        prompt = shapes._tidy(f"a {target} {obj.shape} {SIDE_PHRASE[obj.position]}")  # "an orange ..."
        spec = Spec((ObjectSpec(target, obj.shape, obj.position),))
        cases.append((shapes.render(scene, SIZE, seed=k), prompt, spec, obj))
    return cases


def half_cases(n: int, seed: int):
    """(input with one object, repaint mask of the other half, prompt, spec, side of the kept object)."""
    cases = []
    for k in range(n):
        rng = random.Random(seed * 100_019 + k)
        scene = shapes.two_object_scene(rng, relation=rng.choice(("left of", "right of")))
        keep = rng.randrange(2)  # which object stays in the input
        kept = scene.objects[keep]
        single = shapes.Scene(objects=(kept,), caption="", background=scene.background)
        image = shapes.render(single, SIZE, seed=k)
        kept_side = "left" if kept.x < 0.5 else "right"
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(255, (SIZE // 2, 0, SIZE, SIZE) if kept_side == "left" else (0, 0, SIZE // 2, SIZE))
        a, b = scene.objects
        prompt = shapes._tidy(f"a {a.color} {a.shape} {REL_PHRASE[scene.relation]} a {b.color} {b.shape}")
        spec = Spec((ObjectSpec(a.color, a.shape), ObjectSpec(b.color, b.shape)), scene.relation)
        new = scene.objects[1 - keep]
        cases.append(dict(image=image, mask=mask, prompt=prompt, spec=spec, kept_side=kept_side, new=new))
    return cases


def box_cases(n: int, seed: int):
    """A two-object scene with one object boxed by the mask, and a prompt that asks for another object there."""
    cases = []
    for k in range(n):
        rng = random.Random(seed * 100_043 + k)
        scene = shapes.two_object_scene(rng, relation=rng.choice(("left of", "right of", "above", "below")))
        image = shapes.render(scene, SIZE, seed=k)
        replace = rng.randrange(2)
        old, other = scene.objects[replace], scene.objects[1 - replace]
        pairs = [p for p in shapes.allowed_pairs() if p not in ((old.color, old.shape), (other.color, other.shape))]
        color, shape = rng.choice(pairs)
        # a square box around the replaced object: 1.6 radii (the triangle's and star's reach) plus a pixel
        half = old.radius * SIZE * 1.6 + 1
        box = tuple(int(round(v)) for v in (old.x * SIZE - half, old.y * SIZE - half, old.x * SIZE + half,
                                             old.y * SIZE + half))
        box = (max(0, box[0]), max(0, box[1]), min(SIZE, box[2]), min(SIZE, box[3]))
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(255, box)
        a, b = ((color, shape), (other.color, other.shape)) if replace == 0 else \
            ((other.color, other.shape), (color, shape))
        relation = "left of" if scene.relation == "and" else scene.relation
        rel = REL_PHRASE.get(relation, relation)
        prompt = shapes._tidy(f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}")
        spec = Spec((ObjectSpec(*a), ObjectSpec(*b)), relation)
        new = shapes.ShapeObject(shape=shape, color=color, x=old.x, y=old.y, radius=old.radius)
        cases.append(dict(image=image, mask=mask, prompt=prompt, spec=spec, new=new, box=box))
    return cases


# --- measuring --------------------------------------------------------------------------------


def progress(row) -> None:
    """Each measured row as soon as it is done (stderr), so a stopped run still shows what it measured."""
    print("  done:", " | ".join(str(c).strip() for c in row), file=sys.stderr, flush=True)


def pct(hits, n) -> str:
    return f"{100 * hits / max(n, 1):5.1f}%"


def table(headers, rows) -> str:
    from genkit.eval.report import text_table

    return text_table(headers, rows)


def found_new(judgement, new, region) -> bool:
    """The asked object (colour and shape) found with its centre inside `region` (x0, x1 as fractions)."""
    return any(o.color == new.color and o.shape == new.shape and region[0] <= o.center[0] <= region[1]
               for o in judgement.objects)


def max_kept_diff(outputs, inputs, masks) -> int:
    worst = 0
    for out, inp, mask in zip(outputs, inputs, masks):
        keep = np.asarray(mask) < 128
        diff = np.abs(np.asarray(out, dtype=int) - np.asarray(inp, dtype=int))[keep]
        worst = max(worst, int(diff.max()))
    return worst


def seam(image: Image.Image, mask: Image.Image) -> float:
    """How far the repainted background is from the kept one: the mean over R, G, B of the difference of
    their median background colours, in levels (background: pixels with max - min of RGB under 20;
    the shapes world's backgrounds are near-grey and its objects saturated)."""
    pixels = np.asarray(image, dtype=float)
    grey = (pixels.max(axis=-1) - pixels.min(axis=-1)) < 20
    repaint = np.asarray(mask) >= 128
    inside, outside = pixels[grey & repaint], pixels[grey & ~repaint]
    if len(inside) == 0 or len(outside) == 0:
        return float("nan")
    return float(np.abs(np.median(inside, axis=0) - np.median(outside, axis=0)).mean())


def letterbox(image: Image.Image) -> Image.Image:
    """A square canvas around a wide image, in the median colour of its border (no resizing)."""
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    color = tuple(int(v) for v in np.median(border, axis=0))
    side = max(image.size)
    square = Image.new("RGB", (side, side), color)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def img2img_section(run: Runner, cases, strengths, default_strength: float):
    inputs = [c[0] for c in cases]
    prompts = [c[1] for c in cases]
    seeds = list(range(len(cases)))
    rows, outputs = [], {}
    for strength in strengths:
        start = time.perf_counter()
        images = run(prompts, seeds, image=inputs, strength=strength)
        outputs[strength] = images
        distance = np.mean([np.abs(np.asarray(o, dtype=float) - np.asarray(i, dtype=float)).mean()
                            for o, i in zip(images, inputs)])
        colour = shape = position = both = correct = 0
        for image, (_, _, spec, obj) in zip(images, cases):
            judgement = judge(image)
            want = spec.objects[0]
            first = judgement.objects[0] if judgement.objects else None
            c = first is not None and first.color == want.color
            s = first is not None and first.shape == obj.shape
            p = first is not None and first.position == obj.position
            colour, shape, position = colour + c, shape + s, position + p
            both += c and s and p
            correct += score(judgement, spec).all_correct
        n = len(cases)
        rows.append((f"{strength:g}", edit_steps(run.steps, strength), f"{distance:6.1f}", pct(colour, n), pct(shape, n),
                     pct(position, n), pct(both, n), pct(correct, n), f"{time.perf_counter() - start:5.0f} s"))
        progress(rows[-1])
    print(f"\nimg2img: recolour one object, {len(cases)} scenes, {run.steps} steps, guidance {run.guidance:g} "
          f"(default strength {default_strength:g})")
    print(table(("strength", "steps", "mean |diff|", "asked colour", "shape kept", "position kept",
                 "colour+shape+position", "all-correct", "time"), rows))
    # strength 1.0 against text-to-image with the same prompt and seed
    if 1.0 in outputs:
        t2i = run(prompts, seeds)
        a = np.stack([np.asarray(i, dtype=int) for i in outputs[1.0]])
        b = np.stack([np.asarray(i, dtype=int) for i in t2i])
        same_images = int(sum((x == y).all() for x, y in zip(a, b)))
        print(f"strength 1.0 vs text-to-image, same prompts and seeds: {same_images}/{len(a)} images identical, "
              f"{100 * (a == b).mean():.2f}% of values equal, largest difference {np.abs(a - b).max()} levels, "
              f"mean {np.abs(a - b).mean():.3f}")
    return outputs


def edit_steps(steps: int, strength: float) -> int:
    return min(int(steps * strength), steps)


def inpaint_section(run: Runner, cases, variants):
    inputs = [c["image"] for c in cases]
    masks = [c["mask"] for c in cases]
    prompts = [c["prompt"] for c in cases]
    seeds = list(range(len(cases)))
    rows, outputs = [], {}
    for method, strength in [("text-to-image", None)] + variants:
        start = time.perf_counter()
        images = run(prompts, seeds) if method == "text-to-image" else run(
            prompts, seeds, image=inputs, mask_image=masks, strength=strength, inpaint_noise=method)
        outputs[(method, strength)] = images
        right = new = two = 0
        seams = [seam(image, case["mask"]) for image, case in zip(images, cases)]
        for image, case in zip(images, cases):
            judgement = judge(image)
            right += score(judgement, case["spec"]).all_correct
            region = (0.5, 1.0) if case["kept_side"] == "left" else (0.0, 0.5)
            new += found_new(judgement, case["new"], region)
            two += judgement.count == 2
        kept = "-" if method == "text-to-image" else max_kept_diff(images, inputs, masks)
        rows.append((method, "-" if strength is None else f"{strength:g}", kept, pct(right, len(cases)),
                     pct(new, len(cases)), pct(two, len(cases)), f"{np.nanmean(seams):.2f}",
                     f"{time.perf_counter() - start:5.0f} s"))
        progress(rows[-1])
    print(f"\ninpainting: one object kept, the other half masked, prompt names both and their relation; "
          f"{len(cases)} scenes")
    print(table(("known region", "strength", "max diff outside mask", "both objects + relation",
                 "asked object in the mask", "exactly two objects", "seam (levels)", "time"), rows))
    return outputs


def box_section(run: Runner, cases, variants):
    inputs = [c["image"] for c in cases]
    masks = [c["mask"] for c in cases]
    prompts = [c["prompt"] for c in cases]
    seeds = list(range(len(cases)))
    rows, outputs = [], {}
    for method, strength in variants:
        start = time.perf_counter()
        images = run(prompts, seeds, image=inputs, mask_image=masks, strength=strength, inpaint_noise=method)
        outputs[(method, strength)] = images
        right = new = two = 0
        seams = [seam(image, case["mask"]) for image, case in zip(images, cases)]
        for image, case in zip(images, cases):
            judgement = judge(image)
            right += score(judgement, case["spec"]).all_correct
            x0, y0, x1, y1 = case["box"]
            new += any(o.color == case["new"].color and o.shape == case["new"].shape
                       and x0 <= o.center[0] * SIZE <= x1 and y0 <= o.center[1] * SIZE <= y1
                       for o in judgement.objects)
            two += judgement.count == 2
        rows.append((method, f"{strength:g}", max_kept_diff(images, inputs, masks), pct(right, len(cases)),
                     pct(new, len(cases)), pct(two, len(cases)), f"{np.nanmean(seams):.2f}",
                     f"{time.perf_counter() - start:5.0f} s"))
        progress(rows[-1])
    print(f"\ninpainting, replace one object: a box around one of two objects is masked and the prompt asks for "
          f"another colour-shape pair there; {len(cases)} scenes")
    print(table(("known region", "strength", "max diff outside mask", "both objects + relation",
                 "asked object in the box", "exactly two objects", "seam (levels)", "time"), rows))
    return outputs


def outpaint_section(run: Runner, cases, variants):
    prompts = [c["prompt"] for c in cases]
    seeds = list(range(len(cases)))
    rows, outputs = [], {}
    for fill, method, strength in variants:
        start = time.perf_counter()
        padded, masks, regions = [], [], []
        for case in cases:
            # extend on the side of the removed object: right of a kept left object, else left
            side = {"right": EXTEND} if case["kept_side"] == "left" else {"left": EXTEND}
            image, mask = readers.outpaint(case["image"], fill=fill, **side)
            padded.append(image)
            masks.append(mask)
            width = SIZE + EXTEND
            regions.append((SIZE / width, 1.0) if "right" in side else (0.0, EXTEND / width))
        images = run(prompts, seeds, image=padded, mask_image=masks, strength=strength, inpaint_noise=method)
        outputs[(fill, method, strength)] = (padded, masks, images)
        right = new = 0
        seams = [seam(image, mask) for image, mask in zip(images, masks)]
        for image, case, region in zip(images, cases, regions):
            judgement = judge(letterbox(image))
            right += score(judgement, case["spec"]).all_correct
            new += found_new(judgement, case["new"], region)
        rows.append((fill, f"{strength:g}", method, max_kept_diff(images, padded, masks), pct(right, len(cases)),
                     pct(new, len(cases)), f"{np.nanmean(seams):.2f}", f"{time.perf_counter() - start:5.0f} s"))
        progress(rows[-1])
    print(f"\noutpainting: 32x32 one-object scenes extended by {EXTEND} px on the far side to 48x32, the prompt asks "
          f"for a second object there; judged letterboxed to 48x48; {len(cases)} scenes")
    print(table(("fill", "strength", "known region", "max diff on the original", "both objects + relation",
                 "asked object in the new strip", "seam (levels)", "time"), rows))
    return outputs


# --- the picture ---------------------------------------------------------------------------------


def picture(path: Path, rows, scale: int = 4):
    """rows: (label, input, mask or None, output); each cell scaled up with NEAREST."""
    width = max(r[1].width for r in rows) * scale
    height = max(r[1].height for r in rows) * scale
    label_w, pad, head = 96, 6, 16
    canvas = Image.new("RGB", (label_w + 3 * (width + pad), head + len(rows) * (height + pad)), (190, 190, 190))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(("input", "mask (white = repaint)", "output")):
        draw.text((label_w + k * (width + pad), 2), title, fill=(0, 0, 0))
    for r, (label, image, mask, output) in enumerate(rows):
        y = head + r * (height + pad)
        for line, text in enumerate(label.split("\n")):
            draw.text((2, y + 2 + 11 * line), text, fill=(0, 0, 0))
        for k, cell in enumerate((image, mask, output)):
            if cell is None:
                continue
            big = cell.convert("RGB").resize((cell.width * scale, cell.height * scale), Image.Resampling.NEAREST)
            canvas.paste(big, (label_w + k * (width + pad), y))
    canvas = canvas.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    canvas.save(path, optimize=True)
    return path.stat().st_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100, help="scenes per task")
    parser.add_argument("--seed", type=int, default=0, help="which scenes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--strengths", default="0.1,0.3,0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--quick", action="store_true", help="only the defaults in the inpainting/outpainting tables")
    parser.add_argument("--inpaint-variants", default=INPAINT_VARIANTS,
                        help="known-region method:strength list for the half-mask table (+rN: N passes per step)")
    parser.add_argument("--box-variants", default=BOX_VARIANTS, help="the same for the replace-one-object table")
    parser.add_argument("--outpaint-variants", default=OUTPAINT_VARIANTS, help="fill/method:strength list")
    parser.add_argument("--only", default="img2img,inpaint,box,outpaint", help="sections to run")
    parser.add_argument("--picture", type=Path, default=None, help="write a grid of examples (PNG)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from genkit import edit

    run = Runner(args.steps, args.guidance, args.batch_size, args.scheduler)
    sections = set(args.only.split(","))
    started = time.perf_counter()
    print(f"genkit-mini, {args.scheduler}, {torch.get_num_threads()} thread(s); scenes from seed {args.seed}")
    recolor = recolor_cases(args.scenes, args.seed)
    halves = half_cases(args.scenes, args.seed)
    shown = []
    if "img2img" in sections:
        strengths = [float(s) for s in args.strengths.split(",")]
        outs = img2img_section(run, recolor, strengths, edit.IMG2IMG_STRENGTH)
        for k in range(2):
            for s in (0.3, edit.IMG2IMG_STRENGTH):
                if s in outs:
                    shown.append((f"img2img {s:g}\n{recolor[k][1]}", recolor[k][0], None, outs[s][k]))
    default = (run.default_method, edit.INPAINT_STRENGTH)
    if "inpaint" in sections:
        variants = [default] if args.quick else _variants(args.inpaint_variants)
        outs = inpaint_section(run, halves, variants)
        for k in range(2):
            if default in outs:
                shown.append((f"inpaint\n{halves[k]['prompt']}", halves[k]["image"], halves[k]["mask"], outs[default][k]))
    if "box" in sections:
        boxes = box_cases(args.scenes, args.seed)
        variants = [default] if args.quick else _variants(args.box_variants)
        outs = box_section(run, boxes, variants)
        for k in range(2):
            if default in outs:
                shown.append((f"inpaint (box)\n{boxes[k]['prompt']}", boxes[k]["image"], boxes[k]["mask"],
                              outs[default][k]))
    if "outpaint" in sections:
        variants = [(readers.OUTPAINT_FILL, *default)] if args.quick else _fill_variants(args.outpaint_variants)
        outs = outpaint_section(run, halves, variants)
        chosen = (readers.OUTPAINT_FILL, *default)
        if chosen in outs:
            padded, masks, images = outs[chosen]
            for k in range(2):
                shown.append((f"outpaint +{EXTEND}\n{halves[k]['prompt']}", padded[k], masks[k], images[k]))
    print(f"\n{run.images} images in {time.perf_counter() - started:.0f} s")
    if args.picture and shown:
        size = picture(args.picture, [(_wrap(label), i, m, o) for label, i, m, o in shown])
        print(f"picture: {args.picture} ({size / 1024:.0f} KB)")


def _variants(text: str) -> list[tuple[str, float]]:
    """"fixed:1,fresh+r2:0.8" -> [("fixed", 1.0), ("fresh+r2", 0.8)]: way of re-imposing the known region
    (GenkitMiniPipeline.inpaint_noise, "+rN" for N passes per step) and strength."""
    out = []
    for part in text.split(","):
        method, _, strength = part.strip().partition(":")
        out.append((method, float(strength or 1.0)))
    return out


def _fill_variants(text: str) -> list[tuple[str, str, float]]:
    """"mean/fixed:1,edge/fixed:0.8" -> [("mean", "fixed", 1.0), ("edge", "fixed", 0.8)]."""
    out = []
    for part in text.split(","):
        fill, _, rest = part.strip().partition("/")
        out.append((fill, *_variants(rest)[0]))
    return out


def _wrap(label: str, width: int = 16) -> str:
    lines = []
    for part in label.split("\n"):
        line = ""
        for word in part.split():
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
