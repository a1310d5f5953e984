"""Data as people have it: aspect-ratio buckets, several training sizes, caption dropout, tag shuffling, loss masks."""

import math
import random
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from genkit.cli import main
from genkit.data import buckets as bk
from genkit.data.captions import caption_variant, split_tags
from genkit.data.decode import load_image, load_training_pair
from genkit.data.imagefolder import scan_folder
from genkit.train.lora import train_lora
from genkit.train.recipe import TrainConfig
from genkit.train.sampling import Streams, pass_items, plan_data

FAST = ["train.device=cpu", "train.threads=1", "validation.every=0", "prior.images=4", "prior.batch_size=4"]
ASPECTS = {"square": (64, 64), "wide": (96, 64), "tall": (64, 96)}  # 1:1, 3:2, 2:3


def picture(width, height, seed):
    """A random picture with a white square in it: content a crop would cut."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
    pixels[height // 4:height // 2, width // 4:width // 2] = 255
    return Image.fromarray(pixels)


def aspect_dataset(folder: Path, per_aspect: int = 2, masks: bool = True) -> Path:
    """Images in three aspect ratios with tag captions ("sks, red, wide 0"); a half-black mask on each wide one."""
    folder.mkdir(parents=True, exist_ok=True)
    for a, (name, (width, height)) in enumerate(ASPECTS.items()):
        for i in range(per_aspect):
            picture(width, height, 10 * a + i).save(folder / f"{name}{i}.png")
            (folder / f"{name}{i}.txt").write_text(f"sks, {['red', 'blue'][i % 2]}, {name} {i}, photo")
            if masks and name == "wide":
                mask = np.full((height, width), 255, dtype=np.uint8)
                mask[:, : width // 2] = 0
                Image.fromarray(mask).save(folder / f"{name}{i}.mask.png")
    return folder


def square_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        picture(64, 64, i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo, tag{i}, sks thing")
    return folder


def train(data, out, model, *extra, **kwargs):
    return train_lora(data, out, model=str(model), overrides=[*FAST, *extra], progress=False, **kwargs)


def tensors(path):
    return load_file(str(Path(path) / "pytorch_lora_weights.safetensors"))


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- Bucket lists and assignment --------------------------------------------------------------


@pytest.mark.parametrize("resolution, multiple", [(1024, 8), (1024, 16), (512, 8), (768, 8), (32, 4), (64, 8),
                                                  (16, 2), (520, 8)])
def test_buckets_hold_about_the_area_keep_the_multiple_and_the_ratio(resolution, multiple):
    found = bk.bucket_sizes(resolution, multiple)
    assert bk.Bucket(resolution, resolution) in found  # square images train exactly as without buckets
    assert len(found) >= 5 and found == sorted(set(found))
    for bucket in found:
        assert bucket.width % multiple == 0 and bucket.height % multiple == 0
        assert bucket.width * bucket.height <= resolution ** 2
        assert bucket.width * bucket.height >= 0.8 * resolution ** 2, bucket  # about the training area
        assert max(bucket.ratio, 1 / bucket.ratio) <= 2.0
        assert bk.Bucket(bucket.height, bucket.width) in found  # tall and wide alike


def test_sdxl_buckets_at_1024_are_kohyas_and_sdxls():
    found = {str(b) for b in bk.bucket_sizes(1024, 8)}
    assert {"1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344"} <= found
    assert bk.auto_step(1024, 8) == 64 and bk.auto_step(512, 8) == 64
    assert bk.auto_step(256, 8) == 32 and bk.auto_step(32, 4) == 4 and bk.auto_step(64, 16) == 16
    assert "1536x640" in {str(b) for b in bk.bucket_sizes(1024, 8, max_ratio=2.4)}
    with pytest.raises(Exception, match="data.bucket_step must be a multiple of the model's side multiple 16"):
        bk.bucket_sizes(1024, 16, step=40)


def test_each_image_goes_to_the_bucket_of_its_shape():
    choices = bk.bucket_sizes(1024, 8)
    rng = random.Random(0)
    for _ in range(200):
        width, height = rng.randint(200, 3000), rng.randint(200, 3000)
        bucket = bk.nearest(width, height, choices)
        ratio = math.log(width / height)
        assert all(abs(math.log(bucket.ratio) - ratio) <= abs(math.log(b.ratio) - ratio) + 1e-12 for b in choices)
        assert (bucket.width >= bucket.height) == (width >= height) or abs(ratio) < 0.07  # landscape stays landscape
    assert bk.nearest(3000, 3000, choices) == bk.Bucket(1024, 1024)
    assert bk.nearest(1500, 1000, choices) == bk.Bucket(1216, 832)  # 3:2
    assert bk.nearest(1000, 1500, choices) == bk.Bucket(832, 1216)
    assert bk.nearest(4000, 1000, choices) == bk.Bucket(1408, 704)  # past the widest: the widest
    assert bk.cropped_share(1500, 1000, bk.Bucket(1216, 832)) < 0.03


def test_buckets_off_or_square_images_are_the_square_crop(tmp_path):
    spec = bk.BucketSpec((32,), 4, enabled=False)
    assert spec.plan([(96, 64), (64, 64)]).buckets == [bk.Bucket(32, 32)]
    on = bk.BucketSpec((32,), 4).plan([(64, 64), (50, 50), (96, 64)])
    assert [str(on.bucket_of(e)) for e in range(3)] == ["32x32", "32x32", "40x24"]
    picture(96, 64, 0).save(tmp_path / "a.png")
    square = np.asarray(load_image(tmp_path / "a.png", 32))
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.png", (32, 32))), square)
    assert load_image(tmp_path / "a.png", (40, 24)).size == (40, 24)  # the whole width kept, a sliver of height cut


def test_several_training_sizes_give_each_image_an_entry_per_size():
    plan = bk.BucketSpec((32, 48), 4).plan([(64, 64), (96, 64)])
    assert len(plan.entries) == 4 and [i for i, _ in plan.entries] == [0, 0, 1, 1]
    sizes = {(i, str(plan.buckets[b])) for i, b in plan.entries}
    assert sizes == {(0, "32x32"), (0, "48x48"), (1, "40x24"), (1, "56x40")}


# --- Batches: each from one bucket; the unbucketed order unchanged -------------------------------------


def old_item(streams, k, seed, flip):
    """The sampler as it was before buckets (genkit.train.sampling at b27bcff), verbatim: the reference."""
    before = math.floor(k * streams.fraction) if streams.priors else 0
    if streams.priors and math.floor((k + 1) * streams.fraction) > before:
        stream, position, n, offset = 1, before, streams.priors, streams.n
    else:
        stream, position, n, offset = 0, k - before, streams.n, 0
    epoch, position = divmod(position, n)
    rng = np.random.default_rng([seed, epoch] + ([stream] if stream else []))
    order, flips = rng.permutation(n), rng.random(n) < 0.5
    return offset + int(order[position]), epoch, flip and bool(flips[order[position]])


def test_one_bucket_draws_exactly_the_unbucketed_order():
    rng = random.Random(1)
    for _ in range(40):
        n, priors, fraction = rng.randint(1, 30), rng.randint(0, 40), Fraction(rng.choice([0, 1, 1, 2, 3]), 4)
        seed, flip, batch = rng.randrange(100), rng.random() < 0.5, rng.randint(1, 6)
        streams = Streams(n, priors, fraction)
        reference = [old_item(streams, k, seed, flip) for k in range(batch * 20)]
        cfg = TrainConfig(batch_size=batch, gradient_accumulation_steps=1, seed=seed)
        drawn = [row for step in range(20) for row in pass_items(step, 0, cfg, streams, flip)[1]]
        assert drawn == reference


@pytest.mark.parametrize("batch, accumulation, processes, fraction", [
    (4, 1, 1, Fraction(1, 4)), (3, 2, 2, Fraction(0)), (2, 2, 1, Fraction(1, 2)), (5, 1, 3, Fraction(1, 3))])
def test_every_pass_draws_from_one_bucket_and_every_entry_equally(batch, accumulation, processes, fraction):
    sizes = [(64, 64)] * 7 + [(96, 64)] * 4 + [(64, 96)] * 2 + [(100, 80)]
    items = [type("Item", (), {"size": s, "mask": None, "path": Path(f"{i}.png")})() for i, s in enumerate(sizes)]
    data = plan_data(items, items[:3], _data(), 4, fraction)
    assert len(data.plan.buckets) == 4
    cfg = TrainConfig(batch_size=batch, gradient_accumulation_steps=accumulation, seed=5)
    seen = Counter()
    for step in range(120):
        for micro in range(accumulation):
            for rank in range(processes):
                bucket, rows = data.rows(step, micro, cfg, True, processes, rank)
                concept = [i for i, _, _ in rows if i < data.instances]
                assert all(data.plan.buckets[data.plan.entries[i][1]] == bucket for i in concept)
                seen.update(concept)
    counts = [seen[i] for i in range(len(items))]
    assert max(counts) - min(counts) <= 2 * batch, counts  # each image as often as any other, bucket sizes aside


def test_the_bucket_schedule_is_the_same_computed_fresh_at_any_step():
    """A resumed run plans its passes anew: pass g's bucket and rows do not depend on what was asked before."""
    streams = Streams(9, 4, Fraction(1, 4), (0, 0, 0, 0, 1, 1, 2, 2, 2))
    cfg = TrainConfig(batch_size=4, gradient_accumulation_steps=1, seed=3)
    unbroken = [pass_items(step, 0, cfg, streams, True) for step in range(30)]
    fresh = Streams(9, 4, Fraction(1, 4), (0, 0, 0, 0, 1, 1, 2, 2, 2))
    assert [pass_items(step, 0, cfg, fresh, True) for step in range(17, 30)] == unbroken[17:]
    assert len({bucket for bucket, _ in unbroken}) == 3


def _data(**values):
    from genkit.train.recipe import DataConfig

    return DataConfig(resolution=32, **values)


# --- Captions ------------------------------------------------------------------------------------


def test_caption_dropout_rate_and_seeding():
    caption = "sks dog, sitting, on grass, photo"
    for rate in (0.1, 0.3):
        dropped = [caption_variant(caption, k, 7, dropout=rate) == "" for k in range(4000)]
        assert abs(sum(dropped) / 4000 - rate) < 0.025
        assert dropped == [caption_variant(caption, k, 7, dropout=rate) == "" for k in range(4000)]
    assert {caption_variant(caption, k, 7) for k in range(50)} == {caption}  # off: untouched
    other_seed = [caption_variant(caption, k, 8, dropout=0.3) == "" for k in range(200)]
    assert other_seed != [caption_variant(caption, k, 7, dropout=0.3) == "" for k in range(200)]


def test_tag_shuffle_keeps_the_leading_tags_and_every_tag():
    caption = "sks dog, sitting, on grass, photo, sunny, 35mm"
    tags = split_tags(caption)
    seen = set()
    for k in range(300):
        shuffled = split_tags(caption_variant(caption, k, 1, shuffle=True, keep_tokens=2))
        assert shuffled[:2] == tags[:2] and sorted(shuffled) == sorted(tags)
        seen.add(tuple(shuffled))
    assert len(seen) > 20  # really shuffled, per sample
    assert caption_variant("a photo of sks dog", 5, 1, shuffle=True, keep_tokens=0) == "a photo of sks dog"
    # turning dropout on keeps every kept sample's shuffle
    on = [caption_variant(caption, k, 1, shuffle=True, dropout=0.5, keep_tokens=1) for k in range(100)]
    off = [caption_variant(caption, k, 1, shuffle=True, keep_tokens=1) for k in range(100)]
    assert all(a == b for a, b in zip(on, off) if a) and sum(not a for a in on) > 30


def test_the_trainer_drops_and_shuffles_concept_captions_only(tiny_mini, tmp_path, monkeypatch):
    from genkit.train.encoders import Encoders

    seen = []
    text = Encoders.text
    monkeypatch.setattr(Encoders, "text", lambda self, captions: seen.append(list(captions)) or text(self, captions))
    data = aspect_dataset(tmp_path / "data", masks=False)
    train(data, tmp_path / "run", tiny_mini, "train.steps=6", "train.batch_size=4", "prior.fraction=0.25",
          "data.caption_dropout=0.4", "data.shuffle_caption=true", "data.keep_tokens=1", "prior.source=render")
    rows = [c for batch in seen for c in batch]
    concept = [c for c in rows if c == "" or c.startswith("sks")]
    assert len(rows) == 24 and len(concept) == 18  # 3 of every 4 rows are the concept's
    assert 3 <= sum(c == "" for c in concept) <= 12  # about 40% dropped
    kept = [split_tags(c) for c in concept if c]
    assert all(tags[0] == "sks" and len(tags) == 4 for tags in kept)
    assert any(tags[-1] != "photo" for tags in kept)  # shuffled
    assert all(not c.startswith("sks") for c in set(rows) - set(concept))  # prior captions as they are


# --- Loss masks ------------------------------------------------------------------------------------


def _masked(folder, value):
    """The aspect dataset with one mask of `value` (255 white, 0 black, "half") on every image."""
    for image in list(folder.glob("*.png")):
        if image.name.endswith(".mask.png"):
            continue
        with Image.open(image) as opened:
            width, height = opened.size
        mask = np.full((height, width), 255 if value == "half" else value, dtype=np.uint8)
        if value == "half":
            mask[:, : width // 2] = 0
        Image.fromarray(mask).save(image.with_name(image.stem + ".mask.png"))
    return folder


def test_masks_weight_the_loss_white_counts_black_is_ignored(tiny_mini, tmp_path):
    """genkit-mini trains in pixels, so the mask is the loss's weight map itself: all white trains exactly as no
    mask; all black teaches nothing (the adapters' B matrices, which start at zero, stay zero); half black is
    neither."""
    base = aspect_dataset(tmp_path / "none", masks=False)
    runs = {}
    for value in (None, 255, 0, "half"):
        folder = base if value is None else _masked(shutil.copytree(base, tmp_path / f"m{value}"), value)
        out = tmp_path / f"run-{value}"
        train(folder, out, tiny_mini, "train.steps=2", "train.batch_size=2", "train.learning_rate=5e-2",
              "prior.source=none")
        runs[value] = tensors(out)
    assert equal(runs[255], runs[None])
    assert all(v.abs().max() == 0 for k, v in runs[0].items() if ".lora.up." in k)
    assert any(v.abs().max() > 0 for k, v in runs["half"].items() if ".lora.up." in k)
    assert not equal(runs["half"], runs[None])


def test_a_mask_follows_its_image_through_crop_flip_and_latent_grid(tiny_sd, tmp_path):
    import genkit
    from genkit.train.encoders import Encoders
    from genkit.train.recipe import load_recipe

    data = aspect_dataset(tmp_path / "data")
    scan = scan_folder(data)
    wide = next(item for item in scan.items if item.path.name == "wide0.png")
    image, mask = load_training_pair(wide.path, (80, 48), mask=wide.mask)
    weights = np.asarray(mask) / 255
    assert image.size == mask.size == (80, 48) and weights[:, :38].max() == 0 and weights[:, 42:].min() == 1
    pipeline = genkit.load(str(tiny_sd), device="cpu")
    recipe = load_recipe(None, ["data.flip=true"])
    encoders = Encoders(pipeline, recipe, 64, "cpu", masks={wide.path: wide.mask})
    bucket = bk.Bucket(80, 48)
    encoders.fill_image_cache([(wide.path, False, bucket), (wide.path, True, bucket)])
    plain, mirrored = encoders.mask_cache[(wide.path, False, bucket)], encoders.mask_cache[(wide.path, True, bucket)]
    latent = encoders.image_cache[(wide.path, False, bucket)].shape[-2:]
    assert plain.shape[-2:] == latent and torch.equal(mirrored, torch.flip(plain, dims=[-1]))
    assert plain[..., : latent[1] // 2 - 1].max() == 0 and plain[..., latent[1] // 2 + 1:].min() == 1


# --- Training runs (resume with every data feature on: tests/test_lora.py) ----------------------------


@pytest.mark.parametrize("model", ["tiny_mini", "tiny_sd"])
def test_defaults_on_square_images_are_bitwise_what_they_were(model, tmp_path, request):
    """The concept suite's datasets are square: with buckets on (the default) a square dataset trains bitwise as
    with buckets off, the centre-crop path, priors, flips and accumulation included; the features that change
    samples (caption dropout, tag shuffling) are off by default."""
    from genkit.train.recipe import DataConfig

    assert (DataConfig().buckets, DataConfig().caption_dropout, DataConfig().shuffle_caption) == (True, 0.0, False)
    data = square_dataset(tmp_path / "square")
    settings = ["train.steps=3", "train.batch_size=2", "train.gradient_accumulation_steps=2",
                "train.learning_rate=1e-2", "data.flip=true", "prior.fraction=0.5", "prior.target=base"]
    runs = {}
    for buckets in ("true", "false"):
        out = tmp_path / f"run-{buckets}"
        train(data, out, request.getfixturevalue(model), *settings, f"data.buckets={buckets}")
        runs[buckets] = tensors(out)
    assert equal(runs["true"], runs["false"])


def test_several_training_sizes_and_random_crops_train(tiny_sd, tmp_path):
    data = aspect_dataset(tmp_path / "data")
    result = train(data, tmp_path / "run", tiny_sd, "train.steps=2", "train.batch_size=2", "data.resolutions=[48, 64]",
                   "data.random_crop=true", "data.cache_latents=false", "train.learning_rate=5e-2")
    record = __import__("json").loads(result.record.read_text())
    assert set(record["buckets"]) == {"48x48", "40x56", "56x40", "64x64", "48x80", "80x48"}
    assert record["recipe"]["data"]["resolution"] == 64 and math.isfinite(result.loss)


# --- genkit data check ------------------------------------------------------------------------------


def test_data_check_shows_the_buckets_and_masks(tiny_sd, tmp_path):
    data = aspect_dataset(tmp_path / "data")
    Image.new("L", (8, 8)).save(data / "orphan.mask.png")
    result = CliRunner().invoke(main, ["data", "check", str(data), "--model", str(tiny_sd)])
    assert result.exit_code == 0, result.output
    for expected in ["masks        2 of 6 images", "orphan.mask.png", "buckets      64 px: 3 used",
                     "48x80  0.60:1      2 images", "64x64  1.00:1      2 images    0.0%", "80x48  1.67:1"]:
        assert expected in result.output, result.output
    result = CliRunner().invoke(main, ["data", "check", str(data), "--model", str(tiny_sd), "--set",
                                       "data.buckets=false", "--set", "data.resolutions=[48, 64]"])
    assert "buckets      48 px: 1 used" in result.output and "64x64  1.00:1      6 images" in result.output
    result = CliRunner().invoke(main, ["data", "check", str(data), "--model", str(tiny_sd), "--set",
                                       "data.resolution=60"])
    assert result.exit_code == 2
    assert "data.resolution must be a positive multiple of 8 for sd models, got 60" in result.output


def test_data_check_without_a_model_shows_the_default_models_buckets(tmp_path):
    data = aspect_dataset(tmp_path / "data", masks=False)
    result = CliRunner().invoke(main, ["data", "check", str(data)])
    assert result.exit_code == 0, result.output
    assert "buckets      32 px: 3 used" in result.output and "40x24  1.67:1      2 images" in result.output
