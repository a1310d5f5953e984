"""genkit-mini edits: img2img (SDEdit), inpainting and outpainting, and reading their input images.

On the tiny random genkit-mini (tests/tiny_models.py) unless a test needs the shipped weights.
"""

import hashlib
import math

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

import genkit
from genkit import edit, schedulers
from genkit.data import shapes
from genkit.errors import GenkitError
from genkit.images import fit_to_size, outpaint, read_image, read_mask, sha256_of
from genkit.invariance import BatchInvariant, rows_apart
from genkit.families.genkit_mini.model import guided

PROMPTS = ["a red circle on the left", "a blue square", "a green triangle at the top"]
SIZE = 16  # the tiny model's canvas


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from tests.tiny_models import build_tiny_mini

    model = genkit.load(str(build_tiny_mini(tmp_path_factory.mktemp("models") / "tiny-mini")), device="cpu")
    assert model.pipe.unet.config.sample_size == SIZE and model.pipe.vae_scale_factor == 2
    return model


def noise_image(seed, size=(SIZE, SIZE)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def half_mask(size=(SIZE, SIZE), right=True):
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 2, 0, size[0], size[1]) if right else (0, 0, size[0] // 2, size[1]))
    return mask


def call(mini, prompts, seeds, *, scheduler="dpm++", steps=6, **kwargs):
    """As genkit's engine calls a pipeline: a fresh scheduler, one CPU generator per image, batch invariance on."""
    pipe = mini.pipe
    pipe.scheduler = schedulers.build(scheduler, mini.base_scheduler_config) if scheduler != "default" else \
        mini.base_scheduler_class.from_config(mini.base_scheduler_config)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with BatchInvariant(), rows_apart(pipe.text_encoder):
        return pipe(prompts, generator=generators, num_inference_steps=steps, output_type="np", **kwargs).images


def reference_text_to_image(pipe, prompts, generators, steps, guidance=4.0):
    """The denoising loop of GenkitMiniPipeline as it was before edits existed, verbatim in substance."""
    embeds, mask = pipe.encode_prompt(prompts, [""] * len(prompts), guidance > 1.0)
    pipe.scheduler.set_timesteps(steps)
    size = pipe.unet.config.sample_size
    sample = randn_tensor((len(prompts), 3, size, size), generator=generators, dtype=pipe.unet.dtype)
    sample = sample * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        model_input = torch.cat([sample] * 2) if guidance > 1.0 else sample
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        prediction = pipe.unet(model_input, t, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
        prediction = guided(prediction, guidance) if guidance > 1.0 else prediction
        sample = pipe.scheduler.step(prediction, t, sample, **pipe._step_kwargs(generators)).prev_sample
    return (sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# --- text-to-image is unchanged ---------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["dpm++", "euler-a", "default"])
def test_text_to_image_unchanged(mini, scheduler):
    new = call(mini, PROMPTS, [3, 4, 5], scheduler=scheduler)
    pipe = mini.pipe
    pipe.scheduler = schedulers.build(scheduler, mini.base_scheduler_config) if scheduler != "default" else \
        mini.base_scheduler_class.from_config(mini.base_scheduler_config)
    generators = [torch.Generator("cpu").manual_seed(s) for s in (3, 4, 5)]
    with torch.inference_mode(), BatchInvariant(), rows_apart(pipe.text_encoder):
        old = reference_text_to_image(pipe, PROMPTS, generators, 6)
    np.testing.assert_array_equal(new, old)


# --- batch invariance ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler, noise, passes", [("dpm++", "fixed", 1), ("euler-a", "fresh", 1),
                                                      ("dpm++", "fixed", 2)])
def test_batch_equals_singles(mini, scheduler, noise, passes):
    images = [noise_image(k) for k in range(3)]
    masks = [half_mask(), half_mask(right=False), half_mask()]
    mini.pipe.inpaint_noise, mini.pipe.inpaint_resample = noise, passes
    try:
        for extra in (dict(strength=0.7), dict(mask_image=masks, strength=0.9)):
            batch = call(mini, PROMPTS, [7, 8, 9], scheduler=scheduler, image=images, **extra)
            for k in range(3):
                one = {key: ([v[k]] if isinstance(v, list) else v) for key, v in extra.items()}
                single = call(mini, [PROMPTS[k]], [7 + k], scheduler=scheduler, image=[images[k]], **one)
                np.testing.assert_array_equal(batch[k], single[0])
    finally:
        mini.pipe.inpaint_noise, mini.pipe.inpaint_resample = edit.INPAINT_NOISE[0], edit.INPAINT_RESAMPLE


def test_one_image_for_all_rows_equals_one_per_row(mini):
    image = noise_image(1)
    shared = call(mini, PROMPTS[:2], [1, 2], image=image, mask_image=half_mask())
    each = call(mini, PROMPTS[:2], [1, 2], image=[image, image], mask_image=[half_mask(), half_mask()])
    np.testing.assert_array_equal(shared, each)
    expanded = mini.pipe("x", num_images_per_prompt=2, image=image, num_inference_steps=2, output_type="np",
                         generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    assert expanded.shape == (2, SIZE, SIZE, 3) and not np.array_equal(expanded[0], expanded[1])


# --- inpainting keeps the unmasked region exactly --------------------------------------------------


@pytest.mark.parametrize("noise, passes", [(n, 1) for n in edit.INPAINT_NOISE] + [("fixed", 3)])
def test_unmasked_region_equals_input(mini, noise, passes):
    images = [noise_image(k) for k in range(2)]
    masks = [half_mask(), half_mask(right=False)]
    mini.pipe.inpaint_noise, mini.pipe.inpaint_resample = noise, passes
    try:
        mini.pipe.scheduler = schedulers.build("dpm++", mini.base_scheduler_config)
        out = mini.pipe(PROMPTS[:2], image=images, mask_image=masks, num_inference_steps=4,
                        generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # PIL, as saved
    finally:
        mini.pipe.inpaint_noise, mini.pipe.inpaint_resample = edit.INPAINT_NOISE[0], edit.INPAINT_RESAMPLE
    for image, mask, result in zip(images, masks, out):
        keep = np.asarray(mask) < 128
        got, want = np.asarray(result), np.asarray(image)
        np.testing.assert_array_equal(got[keep], want[keep])
        assert (got[~keep] != want[~keep]).mean() > 0.5  # the masked half was repainted


def test_tensor_inputs(mini):
    image = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[:, :, 4:12, 4:12] = 1.0
    out = call(mini, PROMPTS[:2], [0, 1], image=image, mask_image=mask)
    keep = (mask[:, 0] < 0.5).numpy()
    want = ((image + 1) / 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out[keep], want[keep], atol=1e-6)
    pil = call(mini, PROMPTS[:2], [0, 1], image=[Image.fromarray(np.uint8(np.round(w * 255))) for w in want],
               mask_image=mask)
    assert pil.shape == out.shape


# --- strength -------------------------------------------------------------------------------------


def steps_run(mini, steps, **kwargs):
    seen = []
    mini.pipe.scheduler = schedulers.build("dpm++", mini.base_scheduler_config)
    mini.pipe("a red circle", num_inference_steps=steps, output_type="np", generator=[torch.Generator()],
              callback_on_step_end=lambda pipe, i, t, tensors: seen.append(int(t)), **kwargs)
    return seen


def test_strength_keeps_the_last_steps(mini):
    image = noise_image(0)
    full = steps_run(mini, 10)
    assert steps_run(mini, 10, image=image, strength=0.5) == full[5:]
    assert steps_run(mini, 10, image=image, strength=1.0) == full
    assert steps_run(mini, 10, image=image, strength=0.25) == full[8:]  # int(10 * 0.25) = 2
    assert steps_run(mini, 10, image=image) == full[2:]  # img2img default 0.8
    assert steps_run(mini, 10, image=image, mask_image=half_mask()) == full  # inpainting default 1.0
    assert edit.default_strength(False) == 0.8 and edit.default_strength(True) == 1.0


def test_low_strength_stays_close(mini):
    image = noise_image(3)
    low = call(mini, PROMPTS[:1], [0], image=image, strength=0.1, steps=20)[0]
    high = call(mini, PROMPTS[:1], [0], image=image, strength=1.0, steps=20)[0]
    pixels = np.asarray(image) / 255
    assert np.abs(low - pixels).mean() < 0.5 * np.abs(high - pixels).mean()


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, 2, float("nan"), float("inf"), "0.5", True])
def test_strength_out_of_bounds(mini, strength):
    with pytest.raises(GenkitError, match=r"strength must be a number in \(0, 1\], got"):
        mini.pipe("a red circle", image=noise_image(0), strength=strength, num_inference_steps=2)


def test_strength_without_steps(mini):
    with pytest.raises(GenkitError, match=r"strength 0.01 with 20 steps leaves no denoising step .* at least 0.05 "
                                          r"or steps to at least 100"):
        mini.pipe("a red circle", image=noise_image(0), strength=0.01, num_inference_steps=20)


def test_strength_needs_an_image(mini):
    with pytest.raises(GenkitError, match="strength 0.5 applies only to an input image"):
        mini.pipe("a red circle", strength=0.5, num_inference_steps=2)
    with pytest.raises(GenkitError, match="mask_image needs an image"):
        mini.pipe("a red circle", mask_image=half_mask(), num_inference_steps=2)


# --- bad inputs -----------------------------------------------------------------------------------


def test_mask_size_unlike_image(mini):
    with pytest.raises(GenkitError, match=r"mask_image is 16x8 but the image is 16x16 \(pass a mask of the image's size"):
        mini.pipe("a red circle", image=noise_image(0), mask_image=Image.new("L", (16, 8), 255), num_inference_steps=2)
    with pytest.raises(GenkitError, match="mask_image is 8x8 but the image is 16x16"):
        mini.pipe("a red circle", image=noise_image(0), mask_image=torch.ones(1, 1, 8, 8), num_inference_steps=2)


def test_all_black_and_all_white_masks(mini):
    with pytest.raises(GenkitError, match="mask_image is all black: nothing to repaint"):
        mini.pipe("a red circle", image=noise_image(0), mask_image=Image.new("L", (SIZE, SIZE), 0))
    with pytest.raises(GenkitError, match=r"mask_image is all white: .*\(drop the mask for image-to-image"):
        mini.pipe("a red circle", image=noise_image(0), mask_image=Image.new("L", (SIZE, SIZE), 255))
    with pytest.raises(GenkitError, match=r"mask_image \(row 1\) is all black"):
        mini.pipe(["a", "b"], image=noise_image(0), mask_image=[half_mask(), Image.new("L", (SIZE, SIZE), 100)])


def test_bad_image_values(mini, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        (text, r"cannot read image .*notes.png: unreadable \(not an image Pillow recognises\); pass a PNG"),
        (tmp_path / "missing.png", r"image file .*missing.png does not exist"),
        (tmp_path, r"is a folder; pass an image file"),
        (42, r"image is a int, not an image; pass a file path, a PIL image or a numpy array"),
        (np.zeros((4, 4, 3), np.float32) + 2, r"values outside \[0, 1\]"),
        (np.zeros((4, 4, 3), np.int64), r"dtype int64; pass uint8"),
        (torch.zeros(1, 4, SIZE, SIZE), r"image tensor has shape \(1, 4, 16, 16\); pass \(batch, 3, h, w\)"),
        (torch.full((1, 3, SIZE, SIZE), 2.0), r"image tensor values must be in \[-1, 1\]"),
        (torch.zeros(1, 3, 12, 12), r"image tensor is 12x12 but the call makes 16x16"),
    ]
    for value, message in cases:
        with pytest.raises(GenkitError, match=message):
            mini.pipe("a red circle", image=value, width=SIZE, height=SIZE, num_inference_steps=2)
    with pytest.raises(GenkitError, match=r"image: got 2 for 3 images \(prompts x num_images_per_prompt\)"):
        mini.pipe(PROMPTS, image=[noise_image(0), noise_image(1)], num_inference_steps=2)
    with pytest.raises(GenkitError, match="width must be a positive multiple of 2, got 15"):
        mini.pipe("a", image=noise_image(0), width=15, num_inference_steps=2)


def test_a_pil_image_is_fitted_to_the_size(mini):
    out = call(mini, ["a"], [0], image=noise_image(0, (21, 17)), strength=0.5)  # rounded down to 20x16
    assert out.shape == (1, 16, 20, 3)
    out = call(mini, ["a"], [0], image=noise_image(0, (21, 17)), width=SIZE, height=SIZE, strength=0.5)
    assert out.shape == (1, SIZE, SIZE, 3)


# --- reading images and masks --------------------------------------------------------------------


def test_read_image_sources(tmp_path):
    rgb = noise_image(0, (5, 3))
    path = tmp_path / "a.png"
    rgb.save(path)
    for source in (path, str(path), rgb, np.asarray(rgb), np.asarray(rgb) / 255.0):
        image = read_image(source)
        assert image.mode == "RGB" and image.size == (5, 3)
        np.testing.assert_array_equal(np.asarray(image), np.asarray(rgb))
    grey = read_image(np.full((3, 5), 7, np.uint8))
    assert grey.mode == "RGB" and np.asarray(grey).max() == 7


def test_read_image_as_training_does(tmp_path):
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): stored 4x2, seen 2x4
    stored = Image.new("RGB", (4, 2), (255, 0, 0))
    stored.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "rotated.jpg").size == (2, 4)
    # 16-bit greyscale is scaled, not clipped
    Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert np.asarray(read_image(tmp_path / "deep.png")).min() == 255
    # transparency on white
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(read_image(tmp_path / "clear.png")).min() == 255


def test_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit: Pillow warns, genkit refuses
    with pytest.raises(GenkitError, match=r"too large \(64x64 pixels is over Pillow's decompression-bomb limit"):
        read_image(tmp_path / "big.png")
    with pytest.raises(GenkitError, match="image of 64x64 pixels is over Pillow's decompression-bomb limit"):
        read_image(Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: Pillow refuses
    with pytest.raises(GenkitError, match=r"too large \(Image size \(4096 pixels\) exceeds limit"):
        read_image(tmp_path / "big.png")


def test_read_mask_modes():
    values = np.array([[0, 127, 128, 255]], np.uint8)
    assert np.asarray(read_mask(values)).tolist() == [[0, 0, 255, 255]]  # binarised at 128
    assert np.asarray(read_mask(values.astype(bool))).tolist() == [[0, 255, 255, 255]]
    assert np.asarray(read_mask(values / 255.0)).tolist() == [[0, 0, 255, 255]]
    rgb = Image.new("RGB", (2, 1), (255, 255, 255))
    rgb.putpixel((0, 0), (10, 10, 10))
    assert np.asarray(read_mask(rgb)).tolist() == [[0, 255]]  # luminance
    deep = Image.fromarray(np.array([[0, 40000]], np.uint16))
    assert np.asarray(read_mask(deep)).tolist() == [[0, 255]]
    # white strokes on a transparent layer: the strokes repaint, the transparent rest is kept
    layer = Image.new("RGBA", (2, 1), (255, 255, 255, 0))
    layer.putpixel((1, 0), (255, 255, 255, 255))
    assert np.asarray(read_mask(layer)).tolist() == [[0, 255]]
    # from_alpha: the transparent hole repaints
    assert np.asarray(read_mask(layer, from_alpha=True)).tolist() == [[255, 0]]
    with pytest.raises(GenkitError, match="has no transparency"):
        read_mask(rgb, from_alpha=True)
    assert read_mask(Image.new("1", (2, 2), 1)).mode == "L"


def test_fit_to_size_rule():
    image = noise_image(0, (37, 21))
    assert fit_to_size(image, multiple=8).size == (32, 16)  # own size rounded down
    assert fit_to_size(image, 64, 32, multiple=8).size == (64, 32)  # as asked
    assert fit_to_size(image, 64, None, multiple=8).size == (64, 16)
    mask = fit_to_size(read_mask(np.eye(21, 37, dtype=bool)), 64, 48, multiple=8)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}  # NEAREST keeps a mask binary
    with pytest.raises(GenkitError, match="width must be a positive multiple of 8, got 30 .try 24 or 32"):
        fit_to_size(image, 30, 16, multiple=8)
    with pytest.raises(GenkitError, match="height 21 is under the model's size multiple 32"):
        fit_to_size(image, multiple=32)


def test_sha256_of(tmp_path):
    path = tmp_path / "a.png"
    noise_image(0).save(path)
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_of(noise_image(0)) == sha256_of(noise_image(0)) != sha256_of(noise_image(1))
    assert len(sha256_of(np.zeros((2, 2), np.uint8))) == 64
    with pytest.raises(GenkitError, match="cannot hash a int"):
        sha256_of(3)


# --- outpainting -------------------------------------------------------------------------------------


def test_outpaint_geometry_and_fill():
    scene = shapes.single_object_scene(__import__("random").Random(0), position="left")
    image = shapes.render(scene, 32)
    padded, mask = outpaint(image, right=16)
    assert padded.size == mask.size == (48, 32)
    pixels, holes = np.asarray(padded), np.asarray(mask)
    np.testing.assert_array_equal(pixels[:, :32], np.asarray(image))
    assert (holes[:, 32:] == 255).all() and (holes[:, :32] == 0).all()
    mean = np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)
    assert np.abs(pixels[:, 32:] - mean).max() <= 0.5
    edge, _ = outpaint(image, left=3, top=2, fill="edge")
    assert edge.size == (35, 34)
    np.testing.assert_array_equal(np.asarray(edge)[2:, 0], np.asarray(image)[:, 0])
    grey, _ = outpaint(image, bottom=4, fill=(1, 2, 3))
    assert np.asarray(grey)[-1, 0].tolist() == [1, 2, 3]
    with pytest.raises(GenkitError, match="needs at least one of left, right, top, bottom"):
        outpaint(image)
    with pytest.raises(GenkitError, match="outpaint left must be a whole number of pixels >= 0, got -1"):
        outpaint(image, left=-1)
    with pytest.raises(GenkitError, match="outpaint fill must be 'edge', 'mean' or an"):
        outpaint(image, right=4, fill="blue")


def test_outpainting_keeps_the_original(mini):
    image = shapes.render(shapes.single_object_scene(__import__("random").Random(1), position="left"), 32)
    padded, mask = outpaint(image, right=16)
    out = call(mini, ["a red circle to the left of a blue square"], [0], image=padded, mask_image=mask)[0]
    assert out.shape == (32, 48, 3)
    np.testing.assert_array_equal(np.round(out[:, :32] * 255).astype(np.uint8), np.asarray(image))


# --- the shipped weights -------------------------------------------------------------------------------


def test_shipped_model_recolours():
    """img2img at the default strength on the shipped genkit-mini: a new colour, the same shape and place."""
    from genkit.eval.judge import judge

    model = genkit.load(device="cpu")
    rng = __import__("random").Random(5)
    cases = [shapes.single_object_scene(rng, color=c, shape=s, position=p, size="large")
             for c, s, p in (("red", "circle", "left"), ("blue", "square", "right"), ("yellow", "triangle", "top"))]
    targets = ("blue", "orange", "red")
    prompts = [f"a {t} {scene.objects[0].shape} on the {scene.objects[0].position}".replace("on the top", "at the top")
               for t, scene in zip(targets, cases)]
    images = call(model, prompts, [0, 1, 2], steps=20, image=[shapes.render(s, 32) for s in cases])
    right = 0
    for pixels, target, scene in zip(images, targets, cases):
        objects = judge(Image.fromarray(np.uint8(np.round(pixels * 255)))).objects
        obj = scene.objects[0]
        right += bool(objects) and (objects[0].color, objects[0].shape, objects[0].position) == (
            target, obj.shape, obj.position)
    assert right >= 2, f"{right}/3"
    assert math.isclose(edit.IMG2IMG_STRENGTH, 0.8)
