"""LoRA training's memory plan (genkit.memory.training): every family's tiny model planned at three budgets, the real
architectures' configs (the README's table), `genkit train lora --dry-run` (text and --json), the activation estimate
against torch's measured peak on the CPU for every tiny model, and the plan applied: gradient checkpointing and block
swapping leave the adapters' training as it was, a budget on the CPU turns checkpointing on and is recorded, and a
budget nothing fits is refused in one line before the model loads."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import genkit
from genkit import testing
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.memory import training, training_runtime
from genkit.memory.sizes import GiB, gib
from genkit.train import adapters
from genkit.train.lora import _check_plan, plan_memory, train_lora
from genkit.train.recipe import resolve
from tests.test_lora import make_dataset

FAST = ["train.device=cpu", "train.threads=1", "validation.every=0", "prior.images=0",
        "train.gradient_accumulation_steps=1"]
TOLERANCE = (0.6, 1.5)  # estimate / measured peak of one training step's activations (fp32, CPU), every tiny family
BOTH = {"bitsandbytes", "torchao"}  # a CUDA machine with genkit[quant] and bitsandbytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> its tiny model's folder, built once when first asked for."""
    root, built = tmp_path_factory.mktemp("tiny"), {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = testing.build_tiny(family, root / family)
        return built[family]
    return folder


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {name: testing.config_folder(name, root / name) for name in ("sdxl", "flux-dev")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "squares")


def _model(folder):
    """What the plan reads: the configs (a diffusers folder), or genkit-mini's loaded modules."""
    try:
        return training.training_model(str(folder))
    except GenkitError:
        return training.training_model(genkit.load(str(folder), device="cpu"))


def _run(family: str, **extra) -> training.LoraRun:
    lora = resolve(None, (), family=family).lora
    return training.LoraRun(rank=lora.rank, target_modules=tuple(lora.target_modules), **extra)


def test_the_plans_chunk_is_the_trainers():
    from genkit.train.encoders import ENCODE_CHUNK

    assert training.ENCODE_CHUNK == ENCODE_CHUNK


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_tiny_family_plans_at_three_budgets(tiny, device):
    """Plenty: nothing needed; the least any steps need: fits, with steps; a byte less: refused in one line that
    names that least budget."""
    for family in testing.FAMILIES:
        model, run = _model(tiny(family)), _run(family, validation_prompts=2, images=4, captions=4)

        def plan(budget):
            return training.plan_training(model, run, device=device, memory=budget, available=BOTH)

        plenty = plan(4 * GiB)
        assert plenty.fits and plenty.steps == [] and plenty.predicted_peak_bytes <= 4 * GiB, family
        least = plenty.smallest_budget_bytes
        tight, short = plan(least), plan(least - 1)
        assert tight.fits and tight.predicted_peak_bytes <= least and tight.steps, (family, tight.reason)
        assert not short.fits and short.predicted_peak_bytes > least - 1, family
        assert short.reason.startswith(f"nothing fits {gib(least - 1)}") and gib(least) in short.reason, short.reason
        assert "\n" not in short.reason and short.refusal().startswith(gib(least - 1))
        if device == "cpu":
            assert set(tight.steps) <= {"checkpointing", "int8", "text-encoders-int8"}, tight.steps


def test_the_trained_parameters_are_peft_s(tiny):
    """The plan's adapter parameters (peft's matching of target_modules, on the meta modules) are what training adds."""
    for family in testing.FAMILIES:
        pipeline = genkit.load(str(tiny(family)), device="cpu")
        recipe = resolve(None, (), family=family)
        planned = training.plan_training(_model(tiny(family)), _run(family), device="cpu", memory=GiB)
        trained = adapters.add(pipeline.pipe, pipeline.family, recipe.lora)
        assert planned.lora_parameters == sum(p.numel() for p in adapters.params(trained).values()), family


def test_the_real_architectures_plan_as_the_readme_table(configs):
    """From configs alone: SDXL at 12 GiB needs checkpointing only; Flux.1-dev's bf16 base does not fit 24 GiB (a
    quantized base does); at 9 GiB Flux swaps blocks; more memory never takes more steps."""
    flux, sdxl = training.training_model(str(configs["flux-dev"])), training.training_model(str(configs["sdxl"]))
    run = training.LoraRun(resolution=1024, rank=16, target_modules=tuple(resolve(None, (), family="flux").lora.
                                                                          target_modules), validation_prompts=4)
    plans = {b: training.plan_training(flux, run, device="cuda", memory=b * GiB, available=BOTH) for b in (9, 12, 24)}
    assert all(p.fits for p in plans.values())
    assert plans[24].quantization is not None and plans[24].blocks_swapped == 0
    assert plans[9].blocks_swapped > 0 and "block-swap" in plans[9].steps
    assert [len(p.steps) + p.blocks_swapped for p in plans.values()] == \
        sorted((len(p.steps) + p.blocks_swapped for p in plans.values()), reverse=True)
    bare = training.plan_training(flux, run, device="cuda", memory=24 * GiB, available=set())
    assert bare.fits and bare.quantization is None and bare.blocks_swapped > 0  # no torchao, no bitsandbytes: swaps
    assert set(bare.unavailable) == {"adamw-8bit", "int8", "nf4", "text-encoders-int8"}
    short = training.plan_training(flux, run, device="cuda", memory=9 * GiB, available=set())
    assert not short.fits and "pip install" in short.reason, short.reason  # T5 alone is 8.9 GiB in bf16
    at12 = training.plan_training(sdxl, training.LoraRun(resolution=1024), device="cuda", memory=12 * GiB,
                                  available=BOTH)
    assert at12.fits and at12.steps == ["checkpointing"] and at12.placement == "gpu"


def test_a_model_genkit_has_no_family_for_plans_from_its_configs(tmp_path):
    """Qwen-Image is no genkit family: `from_configs` reads its pipeline's folder (a tiny one here)."""
    folder = tmp_path / "qwen"
    for name, config in {"transformer": dict(
            _class_name="QwenImageTransformer2DModel", attention_head_dim=16, axes_dims_rope=[4, 6, 6], in_channels=64,
            joint_attention_dim=32, num_attention_heads=2, num_layers=3, out_channels=16, patch_size=2),
            "vae": dict(_class_name="AutoencoderKLQwenImage", base_dim=8, dim_mult=[1, 2, 4, 4], z_dim=16,
                        num_res_blocks=1, temperal_downsample=[False, True, True])}.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"]}))
    model = training.from_configs(folder, text_tokens=64, resolution=256)
    assert model.family == "QwenImagePipeline" and model.latent_side == 16 and model.vae_factor == 8
    plan = training.plan_training(model, training.LoraRun(), device="cuda", memory=2 * GiB, available=BOTH)
    assert plan.fits and plan.blocks == 3 and plan.resolution == 256


def test_dry_run_prints_the_plan_and_its_json(configs, tiny, tmp_path):
    runner = CliRunner()
    base = ["train", "lora", str(tmp_path / "no-data"), "--model", str(configs["flux-dev"]), "--dry-run"]
    text = runner.invoke(main, base + ["--memory", "24GiB"])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].startswith(f"training memory plan for {configs['flux-dev']} (flux) on cuda")
    assert any(line.startswith("peak ") and "predicted of 24.0 GiB: fits" in line for line in lines)
    assert any(line.startswith("why ") for line in lines) and any(line.startswith("transformer ") for line in lines)
    shown = runner.invoke(main, base + ["--memory", "12GiB", "--json"])
    assert shown.exit_code == 0, shown.output
    plan = json.loads(shown.output)
    assert {"components", "placement", "predicted_peak_bytes", "fits", "steps", "phases", "reason"} <= set(plan)
    assert {c["name"] for c in plan["components"]} == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert all({"class", "bytes", "placement", "quantization"} <= set(c) for c in plan["components"])
    assert plan["budget_bytes"] == 12 * GiB and plan["predicted_peak_bytes"] == max(plan["phases"].values())
    small = runner.invoke(main, ["train", "lora", str(tmp_path), "--model", str(tiny("sd")), "--dry-run",
                                 "--memory", "1MiB", "--set", "train.device=cpu", "--json"])
    assert small.exit_code == 0 and json.loads(small.output)["fits"] is False, small.output
    for bad, message in ((["--json"], "--json goes with --dry-run"), ([], "--out is needed")):
        refused = runner.invoke(main, ["train", "lora", str(tmp_path), "--model", str(tiny("sd"))] + bad)
        assert refused.exit_code == 2 and message in refused.output, refused.output


def _measured_peak(pipeline, size: int, checkpointing: bool) -> tuple[int, int]:
    """(the peak of torch's CPU allocations during one training step's forward and backward, the adapters' bytes),
    by the profiler's memory events: what was allocated and freed in order, from the step's start."""
    from torch.profiler import ProfilerActivity, profile

    pipe, family, denoiser = pipeline.pipe, pipeline.family, pipeline.denoiser
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()
    with torch.no_grad():
        cond = family.encode_captions(pipe, ["a red square"], "cpu")
        pixels = torch.zeros(1, 3, size, size)
        clean = family.latents(pipe, family.encode_images(pipe, pixels), [torch.Generator().manual_seed(0)]) \
            if family.latent else pixels
    noisy, t = torch.randn_like(clean), torch.tensor([500.0 if family.flow else 500])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        family.forward(pipe, denoiser, noisy, t, cond).float().pow(2).mean().backward()
    events = sorted((e for e in profiled.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    lora = sum(4 * p.numel() for p in denoiser.parameters() if p.requires_grad)  # their gradients, fp32
    return peak, lora


@pytest.mark.slow  # 13-23 s: nine families profiled twice
def test_the_activation_estimate_is_within_its_tolerance_of_the_cpu_s_measured_peak(tiny):
    """Every tiny family in fp32 on the CPU (256 pixels a side; genkit-mini, in pixel space, 64), with and without
    gradient checkpointing: the estimate plus the adapters' gradients within TOLERANCE of the measured peak."""
    ratios = {}
    for family in testing.FAMILIES:
        pipeline = genkit.load(str(tiny(family)), device="cpu")
        pipe = pipeline.pipe
        for part in (pipeline.denoiser, *pipeline.family.text_encoders(pipe), getattr(pipe, "vae", None)):
            if part is not None:
                part.requires_grad_(False)
        recipe = resolve(None, (), family=family)
        torch.manual_seed(0)
        adapters.add(pipeline.pipe, pipeline.family, recipe.lora)
        model = _model(tiny(family))
        size = 256 if pipeline.family.latent else 64
        for checkpointing in (False, True):
            peak, lora = _measured_peak(pipeline, size, checkpointing)
            estimate = training.training_activations(
                model.denoiser.module, (size // model.latent_side) ** 2, model.text_tokens, 1, 4,
                checkpointing=checkpointing, rank=recipe.lora.rank, targets=recipe.lora.target_modules,
                masked=model.attention_masked) + lora
            ratios[family, checkpointing] = round(estimate / peak, 2)
    low, high = TOLERANCE
    assert all(low <= r <= high for r in ratios.values()), ratios


def _weights(result) -> dict:
    from safetensors.torch import load_file

    return load_file(str(result.weights))


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_gradient_checkpointing_leaves_the_adapters_weights_as_they_were(tiny, data, tmp_path, family):
    runs = [train_lora(data, tmp_path / f"run-{on}", model=str(tiny(family)), progress=False,
                       overrides=[*FAST, "train.steps=2", "train.batch_size=2", "train.learning_rate=1e-2",
                                  "data.resolution=64", f"train.gradient_checkpointing={str(on).lower()}"])
             for on in (False, True)]
    plain, checkpointed = (_weights(run) for run in runs)
    assert plain.keys() == checkpointed.keys()
    for key in plain:  # bitwise here; fp32 tolerance is what the contract allows
        assert torch.allclose(plain[key], checkpointed[key], rtol=0, atol=1e-6), key
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in plain.items() if "up" in k or "lora_B" in k)


@pytest.mark.parametrize("family", ["flux", "z-image"])
def test_block_swapping_gives_the_same_gradients(tiny, family):
    """The swap's plumbing on the CPU (the copies are the CPU's own tensors there): blocks run through
    functional_call under checkpointing, their adapters' gradients as without it."""
    def gradients(swapped: int) -> dict:
        pipeline = genkit.load(str(tiny(family)), device="cpu")
        pipe, fam, denoiser = pipeline.pipe, pipeline.family, pipeline.denoiser
        denoiser.requires_grad_(False)
        torch.manual_seed(0)
        adapters.add(pipe, fam, resolve(None, (), family=family).lora)
        denoiser.enable_gradient_checkpointing()
        if swapped:
            assert len(training_runtime.swap_blocks(denoiser, swapped, "cpu")) == swapped
            training_runtime.place_denoiser(denoiser, "cpu")
        with torch.no_grad():
            cond = fam.encode_captions(pipe, ["a red square"], "cpu")
            clean = fam.latents(pipe, fam.encode_images(pipe, torch.zeros(1, 3, 64, 64)),
                                [torch.Generator().manual_seed(0)])
        fam.forward(pipe, denoiser, torch.ones_like(clean), torch.tensor([500.0]), cond).pow(2).mean().backward()
        return {n: p.grad for n, p in denoiser.named_parameters() if p.requires_grad}

    plain, swapped = gradients(0), gradients(len(training.blocks(_model(tiny(family)).denoiser.module)))
    assert plain.keys() == swapped.keys() and all(torch.equal(plain[k], swapped[k]) for k in plain)


def test_a_cpu_budget_turns_checkpointing_on_and_the_record_says_so(tiny, data, tmp_path):
    """On a CPU the plan is printed and not applied, unless --memory plans its RAM: a budget between the checkpointed
    and the plain step's peaks trains with checkpointing, and genkit_lora.json records the plan."""
    overrides = [*FAST, "train.steps=1", "train.batch_size=16", "data.resolution=128"]
    free = plan_memory(data, model=str(tiny("sd")), overrides=overrides)
    assert free.device == "cpu" and free.steps == [] and free.budget_from == "free on cpu now"
    plain = free.phases["training"]
    least = plan_memory(data, model=str(tiny("sd")), overrides=overrides, memory=free.smallest_budget_bytes)
    budget = (least.predicted_peak_bytes + plain) // 2
    planned = plan_memory(data, model=str(tiny("sd")), overrides=overrides, memory=budget)
    assert planned.fits and planned.steps == ["checkpointing"], planned.reason
    result = train_lora(data, tmp_path / "run", model=str(tiny("sd")), overrides=overrides, progress=False,
                        memory=budget)
    record = json.loads(Path(result.record).read_text())["memory_plan"]
    assert record["applied"] and record["checkpointing"] and record["steps"] == "checkpointing"
    assert record["predicted_peak_bytes"] == planned.predicted_peak_bytes and record["budget_bytes"] == budget
    unplanned = train_lora(data, tmp_path / "plain", model=str(tiny("sd")), overrides=overrides, progress=False)
    assert json.loads(Path(unplanned.record).read_text())["memory_plan"]["applied"] is False


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_the_least_budget_trains_on_an_int8_base_through_genkit_quantize(tiny, data, tmp_path):
    """At the least memory the plan knows on a CPU, the base and the text encoders load int8 (genkit.quantize, torchao)
    and the adapters train on them: finite, and not the unquantized run's weights."""
    overrides = [*FAST, "train.steps=2", "train.batch_size=2", "data.resolution=64", "train.learning_rate=1e-2"]
    least = plan_memory(data, model=str(tiny("flux")), overrides=overrides).smallest_budget_bytes
    quantized = train_lora(data, tmp_path / "int8", model=str(tiny("flux")), overrides=overrides, progress=False,
                           memory=least)
    record = json.loads(Path(quantized.record).read_text())["memory_plan"]
    assert record["quantization"] == "int8" and "text-encoders-int8" in record["steps"], record
    plain = train_lora(data, tmp_path / "plain", model=str(tiny("flux")), overrides=overrides, progress=False)
    a, b = _weights(quantized), _weights(plain)
    assert a.keys() == b.keys() and all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_budget_nothing_fits_is_refused_in_one_line_before_the_load(tiny, data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "lora", str(data), "--model", str(tiny("sd")), "--out", str(out),
                                       "--memory", "1MiB", *(a for o in FAST for a in ("--set", o))])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: --memory 1 MiB (given) is too small for this run")
    assert "the smallest budget that would fit is" in line and not out.exists()


def test_a_resumed_run_keeps_its_optimizer_and_quantization():
    saved = {"memory_plan": {"applied": True, "optimizer": "adamw-8bit", "quantization": "nf4"}}
    same = type("Plan", (), {"optimizer": "adamw-8bit", "quantization": "nf4"})()
    _check_plan(saved, same)
    with pytest.raises(GenkitError, match="trained with optimizer adamw-8bit"):
        _check_plan(saved, type("Plan", (), {"optimizer": "adamw", "quantization": "nf4"})())
    _check_plan({"memory_plan": {"applied": False, "optimizer": "adamw"}}, same)  # a CPU's printed plan binds nothing

