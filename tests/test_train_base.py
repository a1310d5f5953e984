"""genkit-mini's trainer on the tiny recipe: it runs, its loss falls, and resume is exact."""

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from safetensors.torch import load_file

import genkit
from genkit.cli import main
from genkit.train import checkpoint
from genkit.train.base import learning_rate, load_recipe, train_base

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def tiny(*overrides):
    from genkit.cli import _recipe_path

    return load_recipe(_recipe_path("genkit-mini-tiny"), list(overrides))


def test_cli_trains_and_the_result_generates(tmp_path):
    result = CliRunner().invoke(main, ["train", "base", "--config", "genkit-mini-tiny", "--out", str(tmp_path / "run"),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "final"
    assert (final / WEIGHTS).is_file() and (final / "model_index.json").is_file()
    image = genkit.load(str(final), device="cpu").generate(["a red circle"], seed=0, num_inference_steps=2).images[0]
    assert image.size == (16, 16)


def test_loss_falls(tmp_path):
    train_base(tiny("train.steps=60", "train.checkpoint_every=60"), tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_resume_ends_with_the_same_weights(tmp_path):
    recipe = tiny()
    train_base(recipe, tmp_path / "whole", progress=False)
    # a run paused after step 6 (a killed run leaves the same: its last checkpoint)
    paused = train_base(recipe, tmp_path / "paused", progress=False, stop_at=6)
    assert checkpoint.latest(tmp_path / "paused").name == "checkpoint-0000006" and (paused / WEIGHTS).is_file()
    train_base(recipe, tmp_path / "paused", resume=True, progress=False)
    a, b = load_file(str(tmp_path / "whole" / "final" / WEIGHTS)), load_file(str(tmp_path / "paused" / "final" / WEIGHTS))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_checkpoints_rotate_and_resume_needs_one(tmp_path):
    train_base(tiny(), tmp_path, progress=False)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["checkpoint-0000008", "checkpoint-0000012"]
    result = CliRunner().invoke(main, ["train", "base", "--config", "genkit-mini-tiny", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--resume" in result.stderr
    result = CliRunner().invoke(main, ["train", "base", "--config", "genkit-mini-tiny", "--out", str(tmp_path / "new"),
                                       "--resume"])
    assert result.exit_code == 2 and "no complete checkpoint" in result.stderr


def test_learning_rate_schedule():
    cfg = tiny().train
    rates = [learning_rate(step, cfg) for step in range(cfg.steps)]
    assert rates[0] < rates[1] == cfg.learning_rate  # two warm-up steps
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))
    assert rates[-1] >= cfg.min_learning_rate


def test_second_stage_starts_from_the_first(tmp_path):
    first = train_base(tiny(), tmp_path / "one", progress=False)
    start = checkpoint.latest(tmp_path / "one")
    # zero steps of learning rate: the second stage keeps the first stage's weights and EMA exactly
    still = tiny(f"train.init_from={start}", "train.learning_rate=0.0", "train.min_learning_rate=0.0",
                 "train.steps=2", "train.checkpoint_every=2", "train.ema_decay=1.0")
    done = train_base(still, tmp_path / "two", progress=False)
    a, b = load_file(str(first / WEIGHTS)), load_file(str(done / WEIGHTS))
    assert all(np.allclose(a[k].numpy(), b[k].numpy()) for k in a)
    # from a genkit-mini folder too; a path that is neither is a one-line error before anything is written
    train_base(tiny(f"train.init_from={first}", "train.steps=2", "train.checkpoint_every=2"), tmp_path / "three",
               progress=False)
    result = CliRunner().invoke(main, ["train", "base", "--config", "genkit-mini-tiny", "--out", str(tmp_path / "four"),
                                       "--set", f"train.init_from={tmp_path}"])
    assert result.exit_code == 2 and "init_from" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "four").exists()


def test_both_trainers_use_one_vocabulary():
    """The base and LoRA recipes name what they share alike: [train] steps, batch_size, learning_rate,
    warmup_steps, weight_decay, seed, mixed_precision, threads, checkpoint_every, keep_checkpoints; [validation]
    every, prompts, seed, num_inference_steps; ema_decay (the LoRA trainer's EMA is optional: train.ema). What only
    the base trainer has is its own (cosine floor, second-stage start)."""
    import dataclasses

    from genkit.train import base, recipe

    base_train = {f.name for f in dataclasses.fields(base.TrainConfig)}
    lora_train = {f.name for f in dataclasses.fields(recipe.TrainConfig)}
    assert base_train - lora_train == {"min_learning_rate", "init_from"}
    assert {f.name for f in dataclasses.fields(base.ValidationConfig)} == \
        {f.name for f in dataclasses.fields(recipe.ValidationConfig)}
    assert {f.name for f in dataclasses.fields(base.BaseRecipe)} >= {"train", "data", "validation"}
    for path in Path("configs").glob("genkit-mini*.toml"):
        base.load_recipe(path)  # the shipped recipes use these words (unknown keys are errors)
