"""One image reader: training data, edit inputs and the server's uploads are decoded by `genkit.data.decode.open_image`
(upright by EXIF, one list of modes with transparency), so the three see the same pixels and refuse the same files."""

import ast
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genkit import images
from genkit.data import decode
from genkit.errors import GenkitError
from genkit.serve import inputs
from genkit.serve.errors import ApiError

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    rotated = Image.Exif()
    rotated[decode.EXIF_ORIENTATION] = 6
    palette = noise.convert("P")
    made = {
        "photo.jpg": (noise, {"exif": rotated, "quality": 95}),
        "cutout.png": (Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "RGBA"), {}),
        "grey-alpha.png": (Image.fromarray(rng.integers(0, 256, (16, 24, 2), dtype=np.uint8), "LA"), {}),
        "icon.png": (palette, {"transparency": 3}),
        "scan.png": (Image.fromarray(rng.integers(0, 65536, (16, 24), dtype=np.uint16)), {}),
        "print.jpg": (noise.convert("CMYK"), {"quality": 95}),
        "bilevel.png": (noise.convert("1"), {}),
    }
    paths = {}
    for name, (image, options) in made.items():
        image.save(folder / name, **options)
        paths[name] = folder / name
    return paths


def _served(path: Path, max_side: int = 4096):
    return inputs.decode_bytes(path.read_bytes(), "image", max_side)


def test_training_editing_and_the_server_see_the_same_pixels(tmp_path):
    for name, path in _files(tmp_path).items():
        trained = np.asarray(decode.open_rgb(path))
        assert np.array_equal(np.asarray(images.read_image(path)), trained), name
        assert np.array_equal(np.asarray(images.read_image(_served(path))), trained), name
        assert np.array_equal(np.asarray(images.read_mask(path)), np.asarray(images.read_mask(_served(path)))), name
    assert decode.open_rgb(tmp_path / "photo.jpg").size == (16, 24)  # upright: the EXIF turn applied


def test_one_list_of_modes_with_transparency(tmp_path):
    paths = _files(tmp_path)
    with_alpha = {name for name, path in paths.items() if decode.has_alpha(decode.open_image(path))}
    assert with_alpha == {"cutout.png", "grey-alpha.png", "icon.png"}
    for name, path in paths.items():  # the server's OpenAI convention and the edit reader's from_alpha agree
        served = _served(path)
        assert inputs.is_transparent_somewhere(served) == (name in with_alpha and bool(
            (np.asarray(images.read_mask(path, from_alpha=True)) == 255).any())), name
    assert decode.has_alpha(Image.new("La", (2, 2)))  # premultiplied, in memory only: still transparency


def test_the_three_refuse_the_same_files(tmp_path, monkeypatch):
    good = _files(tmp_path)["cutout.png"]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    floats = tmp_path / "floats.tif"
    Image.fromarray(np.zeros((4, 4), np.float32)).save(floats)
    for path, kind in ((truncated, decode.SkipKind.UNREADABLE), (floats, decode.SkipKind.UNSUPPORTED)):
        assert decode.inspect_image(path).kind is kind
        with pytest.raises(decode.Unusable) as training:
            decode.open_rgb(path)
        assert training.value.kind is kind
        with pytest.raises(GenkitError, match=f"cannot read image {path}: {kind.value}"):
            images.read_image(path)
        with pytest.raises(ApiError) as served:
            _served(path)
        assert served.value.param == "image"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24x16 is over it: told from the header
    assert decode.inspect_image(good).kind is decode.SkipKind.TOO_LARGE
    with pytest.raises(GenkitError, match="too large"):
        images.read_image(good)
    with pytest.raises(ApiError, match="not an image genkit can read"):
        _served(good)


def test_the_servers_side_limit_is_told_from_the_header(tmp_path):
    path = _files(tmp_path)["cutout.png"]
    with pytest.raises(ApiError, match=r"the image is 24x16; this server reads input images at most 20 pixels") as \
            refused:
        _served(path, max_side=20)
    assert refused.value.param == "image" and refused.value.code == "limit"
    with pytest.raises(decode.Unusable) as unusable:
        decode.open_image(io.BytesIO(path.read_bytes()), max_side=20)
    assert unusable.value.over_side == (24, 16)


# Where an image file is opened outside the reader, and why that is not decoding an input.
OPENED_ELSEWHERE = {
    ("genkit/outputs.py", "read_record"): "reads a genkit PNG's text chunks, not its pixels",
    ("genkit/data/imagefolder.py", "warn_small_images"): "reads the header's size only, after the scan",
    ("genkit/run.py", "_write_grid"): "genkit's own PNGs of this run, made into the grid",
    ("genkit/run.py", "replay_image"): "genkit's own PNG, compared with its replay",
    ("genkit/run.py", "_pixels_sha256"): "hashes a file's pixels as they were decoded in memory (as a caller "
    "passing Image.open's result would have: no EXIF turn)",
}


def test_image_files_are_decoded_in_one_place():
    found = set()
    for path in sorted((ROOT / "genkit").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "genkit/data/decode.py":
            continue
        for function in ast.parse(path.read_text()).body:  # module-level functions, and what they hold
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and ast.unparse(node.func) in ("Image.open", "PIL.Image.open"):
                    found.add((rel, getattr(function, "name", "<module>")))
    assert found == set(OPENED_ELSEWHERE)


def test_one_list_of_alpha_modes_in_the_source():
    """No module but decode.py spells out the alpha modes or looks for a transparent colour itself."""
    for path in sorted((ROOT / "genkit").rglob("*.py")):
        if path.name == "decode.py":
            continue
        text = path.read_text()
        assert '"RGBa"' not in text and "'RGBa'" not in text and '"transparency" in' not in text, path
