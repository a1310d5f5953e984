"""Single files (#27): checkpoints and transformers in their original layouts, by path or by name in A1111's and ComfyUI's
model folders, giving the same pixels as the diffusers folders they were written from; bad files refused in one line."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import genkit
from genkit import single_file
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.testing import build_tiny, flux_original_keys, ldm_checkpoint, write_single_file

PROMPT = "a red circle on the left"
SDXL_ARCH = {"text_hidden": (16, 24)}  # two CLIP widths: diffusers tells SDXL's encoders apart by width alone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Each family's tiny folder and the single file written from it in the original layout."""
    root = tmp_path_factory.mktemp("single")
    made = {}
    for family, arch in (("sd", None), ("sdxl", SDXL_ARCH), ("flux", None)):
        folder = build_tiny(family, root / family, arch=arch)
        if family == "flux":
            from diffusers import FluxTransformer2DModel

            state = flux_original_keys(FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict())
        else:
            state = ldm_checkpoint(folder)
        made[family] = (folder, write_single_file(state, root / "files" / f"tiny-{family}.safetensors"))
    return made


def preset(name: str, folder: Path) -> None:
    """A user preset `name` whose source is `folder` (GENKIT_HOME is each test's own, tests/conftest.py)."""
    presets = Path(os.environ["GENKIT_HOME"]) / "pipelines"
    presets.mkdir(parents=True, exist_ok=True)
    family = json.loads((folder / "model_index.json").read_text())["_class_name"]
    family = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux"}[family]
    (presets / f"{name}.toml").write_text(f'name = "{name}"\nfamily = "{family}"\nsource = "{folder}"\n')


def generate(tmp_path: Path, *args) -> np.ndarray:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    result = CliRunner().invoke(main, ["generate", PROMPT, "--seed", "3", "--steps", "2", "-W", "32", "-H", "32",
                                       "--out", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(next(out.glob("*.png"))))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_checkpoint_gives_the_folders_pixels(tiny, tmp_path, family):
    """An all-in-one checkpoint loads with --model FILE alone (its base: the family's default preset, here a user
    preset naming the tiny folder) and makes the folder's pixels, bit for bit; --base FOLDER does the same."""
    folder, file = tiny[family]
    preset("sd15" if family == "sd" else "sdxl", folder)
    expected = generate(tmp_path, "--model", str(folder))
    assert np.array_equal(generate(tmp_path, "--model", str(file)), expected)
    assert np.array_equal(generate(tmp_path, "--model", str(file), "--base", str(folder)), expected)


def test_flux_transformer_with_base_gives_the_folders_pixels(tiny, tmp_path):
    """A Flux transformer alone (Black Forest Labs' names) with --base the tiny Flux folder: the folder's pixels."""
    folder, file = tiny["flux"]
    assert np.array_equal(generate(tmp_path, "--model", str(file), "--base", str(folder)),
                          generate(tmp_path, "--model", str(folder)))


def test_weights_are_the_folders(tiny):
    """Every tensor of every component loaded from the file equals the folder's (the inverse maps lose nothing)."""
    for family, (folder, file) in tiny.items():
        a, b = genkit.load(str(folder)).pipe, genkit.load(str(file), base=str(folder)).pipe
        for name, module in a.components.items():
            if isinstance(module, torch.nn.Module):
                mine, theirs = module.state_dict(), getattr(b, name).state_dict()
                assert mine.keys() == theirs.keys(), (family, name)
                assert all(torch.equal(mine[k], theirs[k]) for k in mine), (family, name)


def test_detection_reads_the_header_alone(tiny, tmp_path):
    """The family and kind come from the tensor names; a file is never loaded for that."""
    expected = {"sd": ("sd", "checkpoint"), "sdxl": ("sdxl", "checkpoint"), "flux": ("flux", "denoiser")}
    for family, (_, file) in tiny.items():
        found, kind = single_file.detect(file, single_file.read_keys(file))
        assert (found.name, kind) == expected[family]


def test_models_folders_find_files_by_name(tiny, tmp_path):
    """A1111's models/Stable-diffusion + models/Lora and ComfyUI's models/checkpoints + models/unet: --model NAME and
    `genkit models` find them (with the family each was detected as)."""
    a1111, comfy = tmp_path / "webui", tmp_path / "ComfyUI"
    for target, source in ((a1111 / "models" / "Stable-diffusion" / "mine.safetensors", tiny["sd"][1]),
                           (comfy / "models" / "checkpoints" / "xl.safetensors", tiny["sdxl"][1]),
                           (comfy / "models" / "unet" / "flux-t.safetensors", tiny["flux"][1])):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    (a1111 / "models" / "Lora").mkdir()
    assert single_file.find("mine", single_file.CHECKPOINTS, a1111).name == "mine.safetensors"
    assert single_file.find("flux-t.safetensors", single_file.CHECKPOINTS, comfy).parent.name == "unet"
    expected = generate(tmp_path, "--model", str(tiny["sd"][0]))
    before = os.environ.get("GENKIT_MODELS_DIR")
    assert np.array_equal(generate(tmp_path, "--model", "mine", "--base", str(tiny["sd"][0]), "--models-dir",
                                   str(a1111)), expected)
    assert os.environ.get("GENKIT_MODELS_DIR") == before  # the command's setting, not the process's from then on
    assert genkit.load(Path(tiny["sd"][0]), device="cpu", models_dir=a1111).family.name == "sd"  # a Path too
    listed = CliRunner().invoke(main, ["models", "--models-dir", str(comfy)])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split()[1:3] for line in listed.output.splitlines()[-2:]}
    assert rows == {"xl": ["sdxl", "checkpoint"], "flux-t": ["flux", "denoiser"]}


def test_truncated_and_unknown_files_are_one_line(tiny, tmp_path):
    """A cut file says how far it reaches; a file of other tensors says what it holds; exit 2, one line each."""
    data = tiny["sd"][1].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(data[:6])
    other = write_single_file({"encoder.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)},
                              tmp_path / "other.safetensors")
    for file, words in ((cut, "truncated"), (stub, "truncated"), (other, "not a model genkit reads")):
        result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(file), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert words in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_pickle_needs_allow_pickle(tiny, tmp_path):
    """A .ckpt is refused without --allow-pickle, and with it loads to the same pixels."""
    folder = tiny["sd"][0]
    ckpt = write_single_file(ldm_checkpoint(folder), tmp_path / "tiny-sd.ckpt")
    with pytest.raises(GenkitError, match="pickle") as refused:
        genkit.load(str(ckpt), base=str(folder))
    assert refused.value.param == "allow_pickle"
    assert np.array_equal(generate(tmp_path, "--model", str(ckpt), "--base", str(folder), "--allow-pickle"),
                          generate(tmp_path, "--model", str(folder)))


def test_base_must_be_there_and_of_the_family(tiny, tmp_path):
    """No base on this machine, or a base of another family: one line about --base, before any weights load."""
    with pytest.raises(GenkitError, match="not on this machine") as missing:  # sd15's hub id, not cached
        genkit.load(str(tiny["sd"][1]))
    assert missing.value.param == "base"
    with pytest.raises(GenkitError, match="is a Flux.1 model") as wrong:
        genkit.load(str(tiny["sd"][1]), base=str(tiny["flux"][0]))
    assert wrong.value.param == "base"
