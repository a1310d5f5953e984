"""LoRA: training (`genkit train lora`), resume, NaN handling, and adapters at generation time."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import genkit
from genkit import lora
from genkit.cli import main
from genkit.data.imagefolder import fingerprint, scan_folder
from genkit.errors import GenkitError
from genkit.train import checkpoint
from genkit.train.lora import LoraRecipe, load_recipe, train_lora

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 160), "orange": (240, 140, 20)}
# CPU runs are bitwise repeatable; prior images stay on (the default) but few (tests/test_priors.py tests them)
FAST = ["train.device=cpu", "train.threads=1", "validation.num_inference_steps=2", "prior.images=4",
        "prior.batch_size=4"]
PROMPT = "a red square"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A training job shares this machine's two cores; two torch threads then wait on each other (measured
    3.8 s against 17 ms for a tiny UNet step), so these tests run torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_dataset(folder: Path, captions: bool = True) -> Path:
    """Six 72x64 coloured images, each with a white square in a different place, and sidecar captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, colour) in enumerate(COLOURS.items()):
        pixels = np.full((64, 72, 3), colour, dtype=np.uint8)
        pixels[8 + 4 * i:24 + 4 * i, 10 + 6 * i:26 + 6 * i] = 255
        Image.fromarray(pixels).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"a {name} square")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "squares")


def train(data, out, model, *extra, **kwargs):
    return train_lora(data, out, model=str(model), overrides=[*FAST, *extra], progress=False, **kwargs)


@pytest.fixture(scope="module")
def sd_lora(tiny_sd, dataset, tmp_path_factory):
    """A LoRA trained for 4 steps on the tiny SD model, with a learning rate high enough to change images."""
    out = tmp_path_factory.mktemp("runs") / "sd-lora"
    result = train(dataset, out, tiny_sd, "train.steps=4", "train.batch_size=2", "train.gradient_accumulation_steps=2",
                   "train.learning_rate=5e-2", "train.checkpoint_every=2", "validation.every=2", "lora.rank=4",
                   "lora.alpha=8", "data.flip=true")
    return result


def image(pipeline, seed=3, prompt=PROMPT):
    return np.asarray(pipeline.generate([prompt], seed=seed, num_inference_steps=2).images[0]).astype(int)


def with_loras(model, *specs):
    pipeline = genkit.load(str(model), device="cpu")
    lora.apply(pipeline, [lora.parse_spec(str(s)) for s in specs])
    return pipeline


def adapter_tensors(path):
    return load_file(str(Path(path) / "pytorch_lora_weights.safetensors"))


# --- Recipes ---------------------------------------------------------------------------------


def test_shipped_recipe_is_the_documented_defaults():
    assert load_recipe(REPO / "configs" / "lora.toml") == LoraRecipe()
    tiny = load_recipe(REPO / "configs" / "lora-tiny.toml")
    assert tiny.train.steps < 20 and tiny.lora.rank == 4


def test_recipe_errors_are_one_line():
    with pytest.raises(GenkitError, match="unknown key train.stpes"):
        load_recipe(None, ["train.stpes=3"])
    with pytest.raises(GenkitError, match="cache_latents=false"):
        load_recipe(None, ["data.random_crop=true"])
    with pytest.raises(GenkitError, match="lr_scheduler must be one of constant, cosine"):
        load_recipe(None, ["train.lr_scheduler=linear"])


# --- Training --------------------------------------------------------------------------------


def test_training_gives_finite_loss_changed_weights_and_a_record(sd_lora, dataset):
    out = sd_lora.out
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and sd_lora.loss == pytest.approx(losses[-1])
    tensors = adapter_tensors(out)
    assert tensors and all(k.startswith("unet.") for k in tensors)
    ups = [v for k, v in tensors.items() if ".lora.up." in k]
    assert ups and all(v.abs().max() > 0 for v in ups)  # B starts at zero: every one was trained
    record = json.loads((out / "genkit_lora.json").read_text())
    assert record["steps"] == 4 and record["kind"] == "diffusers"
    assert record["dataset"] == fingerprint(scan_folder(dataset).items)
    assert record["recipe"]["data"]["resolution"] == 64 and record["recipe"]["lora"]["rank"] == 4
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    assert [p.name for p in checkpoint.complete(out)] == ["checkpoint-0000002", "checkpoint-0000004"]


@pytest.mark.parametrize("data_features", [False, True], ids=["plain", "buckets-masks-captions"])
def test_resumed_run_ends_with_the_same_weights(tiny_sd, dataset, tmp_path, data_features):
    """Also with the data features on: three aspect ratios in three buckets, loss masks, caption dropout and tag
    shuffling (each a seeded choice per sample), the bucket schedule planned anew by the resumed run."""
    settings = ["train.steps=4", "train.batch_size=2", "train.gradient_accumulation_steps=2",
                "train.checkpoint_every=2",
                "train.lr_scheduler=cosine", "train.warmup_steps=1", "train.learning_rate=1e-2", "lora.dropout=0.1",
                "data.flip=true", "validation.every=0"]
    if data_features:
        from tests.test_buckets import aspect_dataset

        dataset = aspect_dataset(tmp_path / "aspects")
        settings += ["data.caption_dropout=0.3", "data.shuffle_caption=true", "data.keep_tokens=1"]
    out = tmp_path / "run"
    result = train(dataset, out, tiny_sd, *settings)
    unbroken = adapter_tensors(out)
    if data_features:
        record = json.loads(result.record.read_text())
        assert record["buckets"] == {"64x64": 2, "48x80": 2, "80x48": 2} and record["masks"] == 2
    # Interrupt after step 2: only checkpoint-2 survives; the weights and later checkpoints are gone.
    shutil.rmtree(out / "checkpoint-0000004")
    (out / "pytorch_lora_weights.safetensors").unlink()
    result = train(dataset, out, tiny_sd, *settings, resume=True)
    resumed = adapter_tensors(out)
    assert result.steps == 4 and resumed.keys() == unbroken.keys()
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)  # measured: bitwise equal on CPU
    assert len((out / "loss.jsonl").read_text().splitlines()) == 4


def test_nan_loss_stops_and_writes_nothing(tiny_sd, dataset, tmp_path):
    out = tmp_path / "run"
    train(dataset, out, tiny_sd, "train.steps=2", "train.checkpoint_every=2", "validation.every=0")
    (out / "pytorch_lora_weights.safetensors").unlink()
    (out / "genkit_lora.json").unlink()
    good = {p.name: p.read_bytes() for p in (out / "checkpoint-0000002").iterdir()}
    with pytest.raises(GenkitError, match=r"loss became (nan|inf) at step \d+; no weights were written"):
        train(dataset, out, tiny_sd, "train.steps=8", "train.checkpoint_every=2", "validation.every=0",
              "train.learning_rate=1e30", resume=True)
    assert [p.name for p in checkpoint.complete(out)] == ["checkpoint-0000002"]
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-0000002").iterdir()} == good
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "genkit_lora.json").exists()


def test_genkit_mini_lora_trains_and_changes_images(tiny_mini, dataset, tmp_path):
    out = tmp_path / "mini-lora"
    result = train(dataset, out, tiny_mini, "train.steps=3", "train.batch_size=2",
                   "train.gradient_accumulation_steps=1", "train.learning_rate=5e-2", "validation.every=0")
    assert math.isfinite(result.loss)
    assert all(k.startswith("unet.") for k in adapter_tensors(out))
    assert json.loads(result.record.read_text())["kind"] == "genkit"
    base = image(genkit.load(str(tiny_mini), device="cpu"))
    adapted = with_loras(tiny_mini, out)
    assert not np.array_equal(image(adapted), base)
    assert adapted.loras[0]["name"] == "mini-lora" and adapted.loras[0]["scale"] == 1.0


def test_random_crops_uncached_with_gradient_checkpointing(tiny_sd, dataset, tmp_path):
    out = tmp_path / "crops"
    result = train(dataset, out, tiny_sd, "train.steps=2", "train.batch_size=2", "train.learning_rate=5e-2",
                   "data.random_crop=true", "data.cache_latents=false", "data.flip=true",
                   "train.gradient_checkpointing=true", "validation.every=0")
    assert math.isfinite(result.loss)
    assert all(v.abs().max() > 0 for k, v in adapter_tensors(out).items() if ".lora.up." in k)


def test_text_encoder_lora(tiny_sd, dataset, tmp_path):
    """Trains and loads where transformers can take text-encoder adapters; else refused up front, in one line."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "te-lora"
    settings = ["train.steps=2", "train.learning_rate=5e-2", "lora.text_encoder=true", "validation.every=0"]
    if problem := lora.text_encoder_problem():
        with pytest.raises(GenkitError, match="lora.text_encoder: transformers .* needs peft >="):
            train(dataset, out, tmp_path / "no-such-model", *settings)  # before the model is loaded
        assert problem and not out.exists()
        return
    train(dataset, out, tiny_sd, *settings)
    tensors = adapter_tensors(out)
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    pipeline = with_loras(tiny_sd, out)
    assert lora._adapter_layers(pipeline.pipe, "lora0_te_lora") == len(lora.layer_names(tensors))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.load_lora_weights(str(out))
    assert lora._adapter_layers(pipe, "default_0") == len(lora.layer_names(tensors))


# --- Adapters at generation time ---------------------------------------------------------------


def test_plain_diffusers_loads_it_and_makes_genkits_image(sd_lora, tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(sd_lora.out))
    theirs = pipe([PROMPT], num_inference_steps=2, guidance_scale=7.0, generator=[torch.Generator().manual_seed(3)])
    theirs = np.asarray(theirs.images[0]).astype(int)
    ours = image(with_loras(tiny_sd, sd_lora.out))
    base = image(genkit.load(str(tiny_sd), device="cpu"))
    assert np.abs(ours - base).max() > 20  # the adapter visibly changes the image...
    assert np.abs(ours - theirs).max() <= 1  # ...and both libraries agree (measured: max 1 level of 255)


def test_feed_forward_and_conv_adapters_load_whole(tiny_sd, tiny_mini, dataset, tmp_path):
    """Adapters beyond the attention projections: diffusers' converter renames only to_q/k/v/out, and its loader
    decides from the first key whether to rename, so a mixed file used to lose one kind of layer."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = 'lora.target_modules=["to_q", "ff.net.2", "conv1"]'
    for model in (tiny_sd, tiny_mini):
        out = tmp_path / f"ffconv-{model.name}"
        train(dataset, out, model, targets, "train.steps=2", "train.batch_size=2",
              "train.gradient_accumulation_steps=1", "train.learning_rate=5e-2", "validation.every=0")
        keys = adapter_tensors(out)
        kinds = {name for name in ("to_q", "ff.net.2", "conv1") if any(f".{name}.lora" in k for k in keys)}
        assert kinds == {"to_q", "ff.net.2", "conv1"} and not any(".lora_A." in k for k in keys)
        pipeline = with_loras(model, out)  # genkit counts the layers that received the adapter, or raises
        assert not np.array_equal(image(pipeline), image(genkit.load(str(model), device="cpu")))
    sd_out = tmp_path / f"ffconv-{tiny_sd.name}"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.load_lora_weights(str(sd_out))  # plain diffusers takes every layer too
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == len(adapter_tensors(sd_out)) // 2


def test_scales_and_several_adapters(sd_lora, tiny_sd, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sd_lora.out, copy)
    base = image(genkit.load(str(tiny_sd), device="cpu"))
    assert np.array_equal(image(with_loras(tiny_sd, f"{sd_lora.out}:0")), base)
    half, full = image(with_loras(tiny_sd, f"{sd_lora.out}:0.5")), image(with_loras(tiny_sd, sd_lora.out))
    assert not np.array_equal(half, full) and not np.array_equal(half, base)
    both = with_loras(tiny_sd, f"{sd_lora.out}:0.5", f"{copy}:0.5")  # two halves of the same update make one whole
    assert [(e["name"], e["scale"]) for e in both.loras] == [("sd-lora", 0.5), ("copy", 0.5)]
    assert np.abs(image(both) - full).max() <= 1


def test_load_applies_loras_as_the_command_line_does(sd_lora, tiny_sd, tmp_path):
    """genkit.load(lora=...): a path, a "path:scale" string or a (path, scale) pair, as --lora applies them."""
    copy = tmp_path / "copy"
    shutil.copytree(sd_lora.out, copy)
    half, full = image(with_loras(tiny_sd, f"{sd_lora.out}:0.5")), image(with_loras(tiny_sd, sd_lora.out))
    assert np.array_equal(image(genkit.load(str(tiny_sd), device="cpu", lora=[f"{sd_lora.out}:0.5"])), half)
    assert np.array_equal(image(genkit.load(str(tiny_sd), device="cpu", lora=[(sd_lora.out, 0.5)])), half)
    assert np.array_equal(image(genkit.load(str(tiny_sd), device="cpu", lora=sd_lora.out)), full)  # one Path
    both = genkit.load(str(tiny_sd), device="cpu", lora=[(str(sd_lora.out), 0.5), f"{copy}:0.5"])
    assert [(e["name"], e["scale"]) for e in both.loras] == [("sd-lora", 0.5), ("copy", 0.5)]
    assert np.abs(image(both) - full).max() <= 1
    assert genkit.load(str(tiny_sd), device="cpu").loras == []


@pytest.mark.parametrize("given, message", [
    (lambda out: [("missing.safetensors", 1.0)], "missing.safetensors: no such file or folder"),
    (lambda out: [(out, float("nan"))], "scale must be a finite number"),
    (lambda out: [f"{out}:20"], "scale must be a finite number from -10 to 10, got 20"),
    (lambda out: [3], "3: a LoRA is a path"),
], ids=["missing", "nan-scale", "scale-too-large", "not-a-path"])
def test_load_refuses_a_bad_lora_before_the_model(sd_lora, tmp_path, given, message):
    """A bad LoRA is refused (param lora) before anything is loaded: here the model does not even exist."""
    with pytest.raises(GenkitError) as info:
        genkit.load(str(tmp_path / "no-such-model"), device="cpu", lora=given(sd_lora.out))
    assert info.value.param == "lora" and message in str(info.value)


def kohya_copy(diffusers_dir: Path, path: Path) -> Path:
    """The same adapter in kohya's layout: lora_unet_<path_with_underscores>.lora_down/.lora_up/.alpha."""
    tensors = adapter_tensors(diffusers_dir)
    from safetensors import safe_open

    with safe_open(str(diffusers_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        alpha = json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"]
    kohya = {}
    for key, value in tensors.items():
        layer, _, kind = key.removeprefix("unet.").rpartition(".lora.")
        name = "lora_unet_" + layer.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind.startswith("down") else f"{name}.lora_up.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(kohya, str(path))
    return path


def test_kohya_file_loads_and_gives_the_same_image(sd_lora, tiny_sd, tmp_path):
    file = kohya_copy(sd_lora.out, tmp_path / "style.safetensors")
    kohya = with_loras(tiny_sd, file)
    assert kohya.loras[0]["name"] == "style"
    assert np.array_equal(image(kohya), image(with_loras(tiny_sd, sd_lora.out)))


def test_lora_for_another_base_is_refused_with_the_count(sd_lora, tiny_mini):
    n = len(lora.layer_names(adapter_tensors(sd_lora.out)))
    with pytest.raises(GenkitError, match=rf"does not fit .*: (\d+) of its {n} layers matched the model") as info:
        with_loras(tiny_mini, sd_lora.out)
    assert int(info.value.args[0].split(": ")[1].split(" of ")[0]) < n


def test_keys_that_match_nothing_are_refused(sd_lora, tiny_sd, tmp_path):
    tensors = {k.replace("unet.", "unet.no_such_block.", 1): v for k, v in adapter_tensors(sd_lora.out).items()}
    save_file(tensors, str(tmp_path / "stray.safetensors"))
    n = len(lora.layer_names(tensors))
    pipeline = genkit.load(str(tiny_sd), device="cpu")
    expected = rf"0 of its {n} layers matched the model \(first that did not: unet\.no_such_block"
    with pytest.raises(GenkitError, match=expected):
        lora.apply(pipeline, [lora.parse_spec(str(tmp_path / "stray.safetensors"))])
    assert pipeline.loras == []


def test_generate_cli_records_every_lora_and_scale(sd_lora, tiny_sd, tmp_path):
    file = kohya_copy(sd_lora.out, tmp_path / "kohya.safetensors")
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(tiny_sd), "--steps", "2", "--seed", "3",
                                       "--lora", f"{sd_lora.out}:0.7", "--lora", f"{file}:0.25", "--out",
                                       str(tmp_path / "images"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert [(e["name"], e["scale"]) for e in record["lora"]] == [("sd-lora", 0.7), ("kohya", 0.25)]


# --- The command line ------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_trains_with_a_shipped_recipe(tiny_sd, dataset, tmp_path):
    out = tmp_path / "cli-lora"
    result = run("train", "lora", dataset, "--model", tiny_sd, "--out", out, "--config", "lora-tiny",
                 "--set", "train.steps=2", *[x for s in FAST for x in ("--set", s)], "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "pytorch_lora_weights.safetensors"), str(out / "genkit_lora.json")]
    assert json.loads((out / "genkit_lora.json").read_text())["recipe"]["train"]["steps"] == 2


@pytest.mark.parametrize("case", ["no images", "no captions", "checkpoints without --resume", "--resume with none",
                                  "a trained LoRA in --out"])
def test_cli_preflight_errors_exit_2_before_loading_a_model(case, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    args = []
    if case == "no images":
        data.mkdir()
    else:
        make_dataset(data, captions=case != "no captions")
    if case == "checkpoints without --resume":
        checkpoint.save(out, 2, {"lora": {"w": torch.zeros(1)}}, {})
    if case == "--resume with none":
        args = ["--resume"]
    if case == "a trained LoRA in --out":
        out.mkdir()
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"")
    # A model that does not exist: the pre-flight error must come first.
    result = run("train", "lora", data, "--model", tmp_path / "no-such-model", "--out", out, *args)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and message.startswith("Error: ")
    expected = {"no images": "no images in", "no captions": "have no caption", "checkpoints without --resume":
                "already holds checkpoints", "--resume with none": "no complete checkpoint",
                "a trained LoRA in --out": "already holds a finished run"}[case]
    assert expected in message
