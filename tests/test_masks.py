"""One mask check: genkit generate and the engine, genkit-mini's pipeline and the server's dialects refuse a mask by
`genkit.edit.check_mask`'s rules (the image's size; something, not everything, to repaint) in the same words."""

from pathlib import Path

import pytest
from PIL import Image

from genkit import edit
from genkit.errors import GenkitError
from genkit.serve import inputs
from genkit.serve.errors import ApiError

ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 16)


def half():
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, (8, 0, 16, 16))
    return mask


BAD = {"wrong size": Image.new("L", (16, 8), 255), "all black": Image.new("L", SIZE, 0),
       "all white": Image.new("L", SIZE, 255)}


def test_a_half_mask_passes_everywhere():
    edit.check_mask(half(), SIZE)
    edit.check_mask(edit.Picture("m.png", "0" * 64, half()), SIZE)
    inputs.check_mask(half(), Image.new("RGB", SIZE), "mask", 422)


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("convention", ["white", "transparent"])
def test_the_library_and_the_server_refuse_a_mask_alike(case, convention):
    mask = BAD[case]
    with pytest.raises(GenkitError) as library:
        edit.check_mask(mask, SIZE, convention=convention)
    assert library.value.param == "mask"
    with pytest.raises(ApiError) as served:
        inputs.check_mask(mask, Image.new("RGB", SIZE), "init_images.0", 422, convention=convention)
    assert served.value.status == 422 and served.value.param == "init_images.0"
    assert served.value.message == library.value.naming("init_images.0") == f"init_images.0 {library.value.message}"
    if case != "wrong size":
        words = {"white": ("black", "white"), "transparent": ("opaque", "transparent")}[convention]
        assert f"is all {words[0] if case == 'all black' else words[1]}" in library.value.message


def test_a_pictures_source_names_the_mask():
    with pytest.raises(GenkitError, match="^mask m.png is all black: nothing to repaint"):
        edit.check_mask(edit.Picture("m.png", "0" * 64, BAD["all black"]), SIZE)
    with pytest.raises(GenkitError, match=r"^mask_image \(row 1\) is all white"):
        edit.check_coverage(1.0, param="mask_image", which="(row 1)")
    with pytest.raises(GenkitError, match=r"^mask_image is 16x8 but the image is 16x16 \(pass a mask"):
        edit.check_mask_size((16, 8), SIZE, param="mask_image")


def test_the_mask_rules_are_worded_in_one_place():
    for path in sorted((ROOT / "genkit").rglob("*.py")):
        text = path.read_text()
        if path.name != "edit.py":
            assert "nothing to repaint" not in text and "a mask of the image's size" not in text, path
