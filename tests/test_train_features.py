"""The LoRA trainer's training features (issue #29, part 3): flow-matching timestep sampling, min-SNR weighting, EMA
of the adapter weights, DoRA / LoKr / LoHa adapters, loss curves through accelerate's trackers, and a recipe table
for every family. The defaults train exactly as before these existed (checked bitwise against genkit's old draws
here, and against the previous code path when they were added: genkit-mini, Flux and SD weights byte-identical)."""

import importlib.util
import json
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import genkit
from genkit import lora
from genkit.errors import GenkitError
from genkit.families.base import Target
from genkit.testing import build_tiny
from genkit.train import checkpoint, objectives
from genkit.train.lora import load_recipe, train_lora
from genkit.train.recipe import TRACKERS, TimestepSampling
from tests.test_lora import FAST, make_dataset

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red square"
QUICK = [*FAST, "train.steps=2", "train.batch_size=2", "train.gradient_accumulation_steps=1",
         "train.learning_rate=5e-2", "validation.every=0", "lora.rank=4"]
OFF = ["train.timestep_sampling=uniform", "train.snr_gamma=0", "train.flow_shift=1", "train.ema=false",
       "lora.adapter=lora", "lora.dora=false", "train.log_with=none"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "squares")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> a tiny model folder, built once per module."""
    root, built = tmp_path_factory.mktemp("models"), {}

    def get(family):
        if family not in built:
            built[family] = build_tiny(family, root / family)
        return built[family]
    return get


def train(data, out, model, *extra, **kwargs):
    """A few quick steps; the transformers' tiny models at 32 px (SD's and genkit-mini's own sizes are small) and
    without prior images (the base model would draw them at its 28-50 steps; tests/test_priors.py covers them)."""
    side = [] if Path(model).name in ("sd", "genkit-mini") else ["data.resolution=32", "prior.source=none"]
    return train_lora(data, out, model=str(model), overrides=[*QUICK, *side, *extra], progress=False, **kwargs)


def weights(folder) -> dict:
    return load_file(str(Path(folder) / lora.WEIGHTS_NAME))


def generators(n):
    return [torch.Generator().manual_seed(1000 + i) for i in range(n)]


# --- Timestep sampling and loss weights (pure functions) -------------------------------------------


def test_flow_default_is_genkits_logit_normal_bitwise():
    """auto draws what the trainer always drew (sigmoid of one normal per sample, over the batch), to the bit."""
    clean, noise = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
    noisy, t, target = objectives.noisy(Target.FLOW, None, clean, noise, generators(64))
    before = torch.sigmoid(torch.cat([torch.randn((1,), generator=g) for g in generators(64)]))
    s = before.view(-1, 1, 1, 1)
    assert torch.equal(t, before * 1000) and torch.equal(noisy, (1 - s) * clean + s * noise)
    assert torch.equal(target, noise - clean)
    explicit = objectives.Timesteps(TimestepSampling.LOGIT_NORMAL, logit_mean=0.0, logit_std=1.0)
    assert torch.equal(objectives.flow_sigmas(explicit, generators(64)), before)


def test_logit_normal_has_the_asked_mean_and_std():
    sigmas = objectives.flow_sigmas(objectives.Timesteps(TimestepSampling.LOGIT_NORMAL, logit_mean=0.5,
                                                         logit_std=0.8), generators(20000))
    logits = torch.logit(sigmas.double())
    assert abs(logits.mean().item() - 0.5) < 0.03 and abs(logits.std().item() - 0.8) < 0.03
    assert 0 < sigmas.min() and sigmas.max() < 1


def test_shift_moves_mass_as_sd3s_scheduler_shifts_its_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain, shifted = (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s).sigmas for s in (1.0, 3.0))
    assert torch.allclose(objectives.shift_sigmas(plain, 3.0), shifted, atol=1e-6)
    uniform = objectives.Timesteps(TimestepSampling.UNIFORM)
    u = objectives.flow_sigmas(uniform, generators(20000))
    moved = objectives.flow_sigmas(objectives.Timesteps(TimestepSampling.UNIFORM, shift=3.0), generators(20000))
    # shift 3: sigma > 1/2 exactly when u > 1/4, so three quarters of the draws land in the noisier half
    assert abs((u > 0.5).double().mean().item() - 0.5) < 0.02
    assert abs((moved > 0.5).double().mean().item() - 0.75) < 0.02
    assert torch.equal(objectives.shift_sigmas(u, 1.0), u)


def test_mode_and_uniform_are_diffusers_densities_per_sample():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    for sampling, scheme in ((TimestepSampling.MODE, "mode"), (TimestepSampling.UNIFORM, "none"),
                             (TimestepSampling.COSMAP, "cosmap")):
        ours = objectives.flow_sigmas(objectives.Timesteps(sampling, mode_scale=1.29), generators(8))
        theirs = torch.cat([compute_density_for_timestep_sampling(scheme, 1, mode_scale=1.29, generator=g)
                            for g in generators(8)])
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_diffusers_formula(prediction):
    """The weights diffusers' training scripts write (train_text_to_image_lora.py with --snr_gamma)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    snr = compute_snr(scheduler, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    expected = expected / snr if prediction == "epsilon" else expected / (snr + 1)
    got = objectives.loss_weights(Target.EPSILON, scheduler, t, objectives.Timesteps(snr_gamma=5.0))
    assert torch.equal(got, expected)
    assert got[0] < 0.01  # low noise (high SNR) weighted down...
    if prediction == "epsilon":
        assert got[-1] == 1  # ...high noise (SNR under gamma) kept at 1
    assert objectives.loss_weights(Target.EPSILON, scheduler, t, objectives.Timesteps()) is None


def test_flow_loss_weighting_is_diffusers_sd3_weighting():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.tensor([0.1, 0.5, 0.9])
    for sampling in (TimestepSampling.COSMAP, TimestepSampling.SIGMA_SQRT):
        got = objectives.loss_weights(Target.FLOW, None, sigmas * 1000, objectives.Timesteps(sampling))
        assert torch.allclose(got, compute_loss_weighting_for_sd3(sampling.value, sigmas))
    for sampling in (TimestepSampling.AUTO, TimestepSampling.LOGIT_NORMAL, TimestepSampling.MODE):
        assert objectives.loss_weights(Target.FLOW, None, sigmas * 1000, objectives.Timesteps(sampling)) is None


@pytest.mark.parametrize("setting, message", [
    ("train.timestep_sampling=linear", "train.timestep_sampling must be one of auto, uniform, logit_normal"),
    ("lora.adapter=glora", "lora.adapter must be one of lora, lokr, loha"),
    ("train.log_with=csv", "train.log_with must be none or one of accelerate's trackers"),
    ("train.logit_std=0", "train.logit_std must be"),
    ("train.ema_decay=1", "train.ema_decay must be"),
])
def test_recipe_errors_are_one_line(setting, message):
    with pytest.raises(GenkitError, match=message):
        load_recipe(None, [setting])


def test_adapter_combinations_that_do_not_exist_are_refused():
    with pytest.raises(GenkitError, match="lora.dora decomposes a LoRA's update, and lora.adapter is lokr"):
        load_recipe(None, ["lora.adapter=lokr", "lora.dora=true"])
    with pytest.raises(GenkitError, match="lora.dropout is a LoRA's input dropout, which peft's loha has not"):
        load_recipe(None, ["lora.adapter=loha", "lora.dropout=0.1"])
    with pytest.raises(GenkitError, match="lora.text_encoder trains LoRA adapters only"):
        load_recipe(None, ["lora.adapter=lokr", "lora.text_encoder=true"])


@pytest.mark.parametrize("family, setting, message", [
    ("sd", "train.timestep_sampling=logit_normal", "draws flow-matching sigmas, and this family predicts noise"),
    ("sd", "train.flow_shift=3", "shifts flow-matching sigmas, and this family predicts noise"),
    ("flux", "train.snr_gamma=5", "train.snr_gamma weights noise-prediction (DDPM) timesteps"),
])
def test_settings_for_the_other_kind_of_family_are_one_line(family, setting, message, tiny, dataset, tmp_path):
    with pytest.raises(GenkitError, match=re.escape(message)) as caught:
        train(dataset, tmp_path / "out", tiny(family), setting)
    assert "\n" not in str(caught.value) and not (tmp_path / "out" / lora.WEIGHTS_NAME).exists()


# --- Training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["genkit-mini", "flux"])
def test_defaults_train_as_with_the_new_options_explicitly_off(family, tiny, dataset, tmp_path):
    """genkit-mini (noise prediction: uniform timesteps, no min-SNR, no EMA, plain LoRA) and Flux (logit-normal
    sigmas, as the trainer always drew them): the defaults are the options off, bitwise."""
    explicit = OFF if family == "genkit-mini" else [o for o in OFF if "timestep_sampling" not in o] + [
        "train.timestep_sampling=logit_normal", "train.logit_mean=0", "train.logit_std=1"]
    default = weights(train(dataset, tmp_path / "default", tiny(family)).out)
    off = weights(train(dataset, tmp_path / "off", tiny(family), *explicit).out)
    assert default.keys() == off.keys() and all(torch.equal(default[k], off[k]) for k in default)
    changed = weights(train(dataset, tmp_path / "changed", tiny(family), "train.snr_gamma=5" if family == "genkit-mini"
                            else "train.flow_shift=3").out)
    assert not all(torch.equal(default[k], changed[k]) for k in default)  # the option reaches the training


def ema_run(dataset, out, model, *extra):
    return train(dataset, out, model, "train.ema=true", "train.steps=3", "train.checkpoint_every=3",
                 "validation.every=3", f"validation.prompts=[\"{PROMPT}\"]", "validation.num_inference_steps=2",
                 *extra)


def grid_of(model, folder, out):
    """The validation grid genkit's own loader makes with the exported file (the trainer's last grid, re-made)."""
    from genkit.grid import make_grid

    record = json.loads((Path(folder) / "genkit_lora.json").read_text())["recipe"]["validation"]
    pipeline = genkit.load(str(model), device="cpu")
    lora.apply(pipeline, [lora.parse_spec(str(folder))])
    images = pipeline.generate([PROMPT], seed=record["seed"], num_inference_steps=record["num_inference_steps"],
                               batch_size=1).images
    make_grid(images, [PROMPT], cols=1).save(out)
    return np.asarray(_png(out)).astype(int)


def _png(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").copy()


def trainer_grid(folder, steps: int):
    return np.asarray(_png(Path(folder) / "samples" / f"step-{steps:07d}.png")).astype(int)


def test_ema_weights_differ_from_the_raw_and_are_exported(tiny, dataset, tmp_path):
    """diffusers' EMAModel over the adapters: the checkpoint holds both, the exported file the average, and the
    validation grid is drawn with the average (genkit's loader re-makes it from the exported file)."""
    model = tiny("sd")
    result = ema_run(dataset, tmp_path / "run", model)
    tensors, meta = checkpoint.load(checkpoint.latest(result.out))
    raw, ema = tensors["lora"], tensors["ema"]
    assert raw.keys() == ema.keys() and meta["ema_updates"] == 3
    trained = [k for k in raw if ".lora_B." in k]  # B starts at zero: the average lags behind it
    assert all(not torch.equal(raw[k], ema[k]) for k in trained)
    exported = weights(result.out)
    for name, value in ema.items():  # unet.<layer>.lora_A.default.weight -> unet.<layer>.lora.down.weight
        key = name.replace(".lora_A.default.weight", ".lora.down.weight").replace(".lora_B.default.weight",
                                                                                  ".lora.up.weight")
        assert torch.equal(exported[key], value) and (key.endswith("down.weight") or not torch.equal(exported[key],
                                                                                                     raw[name]))
    assert np.abs(grid_of(model, result.out, tmp_path / "grid.png") - trainer_grid(result.out, 3)).max() <= 1


@pytest.mark.parametrize("family, kind", [("sd", "dora"), ("genkit-mini", "dora"), ("sd", "lokr"),
                                          ("genkit-mini", "loha"), ("flux", "dora"), ("z-image", "lokr"),
                                          ("flux2-klein", "lokr"), ("flux", "loha")])
def test_adapter_kinds_train_and_load_back(family, kind, tiny, dataset, tmp_path):
    """DoRA (peft's use_dora), LoKr and LoHa (peft's LoKrConfig / LoHaConfig) train, are written with their peft config,
    and genkit's loader re-makes the trainer's own last validation grid from the file; plain diffusers loads what its
    loaders read (DoRA everywhere; LoKr for Z-Image and Flux.2) and makes genkit's image."""
    model = tiny(family)
    setting = "lora.dora=true" if kind == "dora" else f"lora.adapter={kind}"
    result = train(dataset, tmp_path / "run", model, setting, "validation.every=2", f"validation.prompts=[\"{PROMPT}\"]",
                   "validation.num_inference_steps=2")
    keys = weights(result.out)
    marker = {"dora": "lora_magnitude_vector", "lokr": ".lokr_w", "loha": ".hada_w"}[kind]
    assert any(marker in k for k in keys)
    assert np.abs(grid_of(model, result.out, tmp_path / "grid.png") - trainer_grid(result.out, 2)).max() <= 1
    if kind != "dora":
        from genkit.lora.files import inspect_lora

        info = inspect_lora(result.out)
        assert info.format == f"peft-{kind}" and sum(info.components.values()) > 0
    plain = kind == "dora" and family != "genkit-mini" or kind == "lokr" and family in ("z-image", "flux2-klein")
    if plain:
        assert_plain_diffusers_makes_genkits_image(model, result.out)


def assert_plain_diffusers_makes_genkits_image(model, folder):
    from diffusers import DiffusionPipeline

    mine = genkit.load(str(model), device="cpu")
    size = {} if mine.family.name == "sd" else {"width": 32, "height": 32}
    base = np.asarray(mine.generate([PROMPT], seed=3, num_inference_steps=2, **size).images[0]).astype(int)
    lora.apply(mine, [lora.parse_spec(str(folder))])
    ours = np.asarray(mine.generate([PROMPT], seed=3, num_inference_steps=2, **size).images[0]).astype(int)
    plain = DiffusionPipeline.from_pretrained(str(model))
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(folder))
    job = mine.plan([PROMPT], genkit.GenerationConfig(seed=3, num_inference_steps=2, **size))
    args = mine.family.call_args(job, [torch.Generator().manual_seed(3)], None)
    for key in ("callback", "callback_steps", "callback_on_step_end"):
        args.pop(key, None)
    theirs = np.asarray(plain(**args).images[0]).astype(int)
    assert np.abs(ours - base).max() > 2 and np.abs(theirs - ours).max() <= 1


@pytest.mark.parametrize("family, sampler", [("sd", "train.snr_gamma=5"), ("flux", "train.timestep_sampling=mode")])
def test_resumed_run_with_ema_dora_and_a_timestep_sampler_ends_with_the_same_weights(family, sampler, tiny, dataset,
                                                                                     tmp_path):
    """tests/test_lora.py's resume protocol with EMA, DoRA and min-SNR (SD) or SD3's mode sampling shifted by 3
    (Flux) on: the EMA's averages and update count travel in the checkpoint, so the export is bitwise the same."""
    import shutil

    settings = ["train.steps=4", "train.gradient_accumulation_steps=2", "train.checkpoint_every=2",
                "train.lr_scheduler=cosine", "train.warmup_steps=1", "train.learning_rate=1e-2", "data.flip=true",
                "train.ema=true", "train.ema_decay=0.9", "lora.dora=true", sampler]
    settings += ["train.flow_shift=3"] if family == "flux" else ["lora.dropout=0.1"]
    out = tmp_path / "run"
    train(dataset, out, tiny(family), *settings)
    unbroken = weights(out)
    shutil.rmtree(out / "checkpoint-0000004")  # interrupted after step 2
    (out / lora.WEIGHTS_NAME).unlink()
    train(dataset, out, tiny(family), *settings, resume=True)
    resumed = weights(out)
    assert resumed.keys() == unbroken.keys() and all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)
    tensors, meta = checkpoint.load(checkpoint.latest(out))
    assert meta["ema_updates"] == 4 and any("lora_magnitude_vector" in k for k in tensors["ema"])
    shutil.rmtree(out / "checkpoint-0000004")  # a checkpoint without averages cannot start one mid-run
    (out / lora.WEIGHTS_NAME).unlink()
    (checkpoint.latest(out) / "ema.safetensors").unlink()
    with pytest.raises(GenkitError, match="made without train.ema, so it holds no averaged weights"):
        train(dataset, out, tiny(family), *settings, resume=True)


# --- Loss curves ----------------------------------------------------------------------------------


def test_tensorboard_event_files_are_written(tiny, dataset, tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        print("skipped: tensorboard is not installed (pip install tensorboard; it is in the dev extra)")
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(dataset, tmp_path / "run", tiny("genkit-mini"), "train.log_with=tensorboard", "train.steps=3")
    events = sorted((result.out / "logs").rglob("events.out.tfevents.*"))
    assert events, list((result.out / "logs").rglob("*"))
    losses = [json.loads(line)["loss"] for line in (result.out / "loss.jsonl").read_text().splitlines()]
    logged = {}
    for file in events:
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            logged.setdefault(tag, []).extend(accumulator.Scalars(tag))
    assert [e.step for e in logged["loss"]] == [1, 2, 3]
    assert [e.value for e in logged["loss"]] == pytest.approx(losses, rel=1e-6)
    assert len(logged["learning_rate"]) == 3


def test_a_tracker_that_is_not_installed_is_one_line_before_the_model_loads(dataset, tmp_path):
    missing = next((name for name in TRACKERS if name != "tensorboard" and importlib.util.find_spec(name) is None),
                   None)
    if missing is None:
        pytest.skip("every tracker accelerate knows is installed here")
    with pytest.raises(GenkitError, match=rf"train.log_with={missing} needs the {missing} package \(pip install "
                                          rf"{missing}\), or set train.log_with=none"):
        train_lora(dataset, tmp_path / "out", model=str(tmp_path / "no-such-model"), progress=False,
                   overrides=[f"train.log_with={missing}"])
    assert not (tmp_path / "out").exists()


# --- Every family's table -------------------------------------------------------------------------


def test_every_family_has_its_table_in_the_shipped_recipe():
    from genkit import families

    tables = tomllib.loads((REPO / "configs" / "lora.toml").read_text())["families"]
    names = [family.name for family in families.all_families()]
    assert not [name for name in names if name not in tables], sorted(set(names) - set(tables))
    assert not [name for name in tables if name not in names]  # no table for a family that does not exist
    for name in names:
        assert load_recipe(None, family=name).lora.rank >= 1  # every table resolves
    assert math.isclose(load_recipe(None, family="flux").train.flow_shift, 1.0)  # the generic default, not measured
