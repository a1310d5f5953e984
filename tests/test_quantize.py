"""Quantized weights (genkit.quantize): torchao int8/fp8 on the CPU, GGUF denoisers, records, replay, LoRAs, refusals.

Every model is a tiny random-weight one (genkit.testing); pixels are compared with the same model unquantized, same
seed and settings. The bounds are the measured differences (in levels of 255, noted beside each) with a little room.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import genkit
from genkit import outputs, quantize
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.run import GenerateRequest, replay_image, run_generate
from genkit.testing import build_tiny, build_tiny_gguf

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_tiny("flux", tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_flux):
    return {"sd": tiny_sd, "flux": tiny_flux}


def pixels(pipeline, seed=3):
    result = pipeline.generate([PROMPT], genkit.GenerationConfig(seed=seed, num_inference_steps=3))
    return np.asarray(result.images[0]).astype(int), result.metadata[0]


@pytest.fixture(scope="module")
def plain(models):
    return {name: pixels(genkit.load(str(folder), device="cpu"))[0] for name, folder in models.items()}


# torchao int8 / fp8 on the CPU: measured max differences from the unquantized image (tiny SD / tiny Flux, 3 steps):
# int8 denoiser 1 / 1, int8 denoiser and text encoders 1 / 1, fp8 both 3 / 6.
@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("spec, bound", [("int8", 2), ("denoiser=int8,text_encoders=int8", 2),
                                         ("denoiser=fp8,text_encoders=fp8", 8)])
def test_torchao_on_the_cpu_generates_close_to_unquantized(models, plain, family, spec, bound):
    pipeline = genkit.load(str(models[family]), device="cpu", quantize=spec)
    denoiser = pipeline.family.denoiser_name
    kind = spec.split("=")[-1]
    expected = {denoiser: kind}
    if "text_encoders" in spec:
        expected.update({name: kind for name in ("text_encoder", "text_encoder_2") if getattr(pipeline.pipe, name, None)})
    weight = next(m.weight for m in pipeline.denoiser.modules() if type(m).__name__ == "Linear")
    assert type(weight).__module__.startswith("torchao")  # really quantized: torchao's tensor subclass
    image, record = pixels(pipeline)
    assert record["quantization"] == expected
    assert np.abs(image - plain[family]).max() <= bound


# GGUF: a tiny Flux transformer written as GGUF (diffusers' key names) loads as the denoiser with the rest from the
# base folder. Measured max differences from the unquantized image: Q8_0 1, Q4_0 10 (mean 1.3); Q5_1 in between.
@pytest.mark.parametrize("quant_type, bound", [("Q8_0", 2), ("Q4_0", 14)])
def test_gguf_denoiser_loads_with_its_base_and_generates(tiny_flux, plain, tmp_path, quant_type, bound):
    file = build_tiny_gguf(tiny_flux, tmp_path / f"flux-{quant_type}.gguf", quant_type, layout="diffusers")
    pipeline = genkit.load(str(file), base=str(tiny_flux), device="cpu")
    image, record = pixels(pipeline)
    assert record["quantization"] == {"transformer": {"gguf": os.path.abspath(file), "types": [quant_type]}}
    assert record["model"] == str(tiny_flux)  # the model is the base; the denoiser's weights are the file's
    assert 0 < np.abs(image - plain["flux"]).max() <= bound
    with_encoders = genkit.load(str(file), base=str(tiny_flux), device="cpu", quantize="text_encoders=int8")
    assert pixels(with_encoders)[1]["quantization"]["text_encoder_2"] == "int8"


def test_gguf_in_the_original_layout_is_read_and_converted_by_diffusers(tiny_flux, tmp_path):
    """ComfyUI-GGUF's layout (double_blocks.*, qkv joined) reaches diffusers' conversion, which splits a single block's
    linear1 at Flux's published width (3072): the tiny model's width makes that one line, naming the mapping."""
    import gguf

    file = build_tiny_gguf(tiny_flux, tmp_path / "flux-original.gguf", "Q8_0")
    names = {tensor.name for tensor in gguf.GGUFReader(str(file)).tensors}
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
            "final_layer.adaLN_modulation.1.weight"} <= names
    with pytest.raises(GenkitError, match="could not map its tensors onto FluxTransformer2DModel") as caught:
        genkit.load(str(file), base=str(tiny_flux), device="cpu")
    assert "\n" not in str(caught.value) and caught.value.param == "model"


def test_original_keys_are_the_inverse_of_the_conversion(tiny_flux):
    """The original layout holds every tensor once, and genkit's width-free conversion (families.flux.flux_to_diffusers,
    diffusers' names at any width) maps it back exactly; qkv and linear1 are joined in diffusers' q, k, v order."""
    import torch
    from diffusers import FluxTransformer2DModel

    from genkit.families.flux import flux_to_diffusers
    from genkit.testing import flux_original_keys

    state = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").state_dict()
    original = flux_original_keys(state)
    assert sum(t.numel() for t in original.values()) == sum(t.numel() for t in state.values())
    assert torch.equal(original["double_blocks.0.img_attn.qkv.weight"][:32], state["transformer_blocks.0.attn.to_q.weight"])
    back = flux_to_diffusers(original)
    assert set(back) == set(state) and all(torch.equal(back[key], state[key]) for key in state)


# Records and replay: the quantization is recorded per component and replay loads with it (identical pixels).
def test_records_and_replay_carry_the_quantization(models, tmp_path):
    request = GenerateRequest(prompts=[PROMPT], out=tmp_path / "out", model=str(models["sd"]), seed=5,
                              num_inference_steps=2, device="cpu", quantize="denoiser=int8,text_encoders=fp8",
                              progress=False)
    record = list(run_generate(request))[0]
    assert record["quantization"] == {"unet": "int8", "text_encoder": "fp8"}
    line = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert line["quantization"] == record["quantization"]
    replay = replay_image(tmp_path / "out" / record["file"], out=tmp_path / "replay")
    assert replay.identical, replay.summary()
    assert outputs.read_record(replay.path)["quantization"] == record["quantization"]


def test_replay_of_a_gguf_image_reads_the_file_again(tiny_flux, tmp_path):
    file = build_tiny_gguf(tiny_flux, tmp_path / "flux-Q4_0.gguf", "Q4_0", layout="diffusers")
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(file), "--base", str(tiny_flux), "--seed",
                                       "2", "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    image = next(Path(line) for line in result.output.splitlines() if line.endswith(".png"))
    replay = replay_image(image)
    assert replay.identical, replay.summary()


def test_a_manifest_with_quantization_is_a_prompts_file(models, tmp_path):
    """`quantization` is an environment key: a run's manifest.jsonl read as a prompts file leaves it to the command
    line, and replay names it among the reasons when it differs."""
    from genkit.prompts import read_prompts_file

    assert outputs.ENVIRONMENT["quantization"] == "quantized weights" and "quantization" in outputs.RECORD_ONLY
    request = GenerateRequest(prompts=[PROMPT], out=tmp_path / "out", model=str(models["sd"]), seed=1,
                              num_inference_steps=2, device="cpu", quantize="int8", progress=False)
    list(run_generate(request))
    specs = read_prompts_file(tmp_path / "out" / "manifest.jsonl")
    assert [spec.prompt for spec in specs] == [PROMPT]


# LoRAs on quantized denoisers: diffusers/peft put them on every kind tested here (measured: the adapted quantized
# image is 51-96 levels from the unadapted one, and 1 (int8, Q8_0) to 10 (Q4_0) from the adapted unquantized one).
@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    from tests.test_lora import make_dataset

    root = tmp_path_factory.mktemp("quantized-lora")
    data = make_dataset(root / "data")
    return {family: genkit.train_lora(data, root / family, model=str(folder), progress=False, overrides=[
        "train.device=cpu", "train.threads=1", "train.steps=3", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", "train.learning_rate=5e-2", "validation.every=0",
        "data.resolution=32", "lora.rank=4", "prior.images=2", "prior.batch_size=2"]).out
        for family, folder in models.items()}


@pytest.mark.parametrize("family, source, bound", [("sd", "int8", 2), ("flux", "int8", 2), ("flux", "Q8_0", 2)])
def test_a_lora_loads_onto_a_quantized_denoiser(models, trained, tmp_path, family, source, bound):
    folder = models[family]
    if source.startswith("Q"):
        file = build_tiny_gguf(folder, tmp_path / f"{source}.gguf", source, layout="diffusers")
        load = dict(name_or_path=str(file), base=str(folder))
    else:
        load = dict(name_or_path=str(folder), quantize=source)
    quantized = pixels(genkit.load(device="cpu", **load))[0]
    adapted, record = pixels(genkit.load(device="cpu", lora=str(trained[family]), **load))
    unquantized = pixels(genkit.load(str(folder), device="cpu", lora=str(trained[family])))[0]
    assert np.abs(adapted - quantized).max() > 20  # the adapter is applied
    assert np.abs(adapted - unquantized).max() <= bound
    assert record["lora"] and record["quantization"]


# Bad values: one line each, naming --quantize (or --base / --model), before the slow load.
@pytest.mark.parametrize("spec, message", [
    ("int4", "'int4' is not a quantization genkit makes"),
    ("denoiser=int8,denoiser=fp8", "each part once"),
    ("denoiser", None),
    ("vae=int8", "no such part to quantize"),
    ("denoiser=", "is not a quantization"),
    ("nf4", "nf4 is bitsandbytes' 4-bit format, whose kernels run on CUDA"),
])
def test_bad_quantize_values_are_one_line(tiny_sd, spec, message):
    with pytest.raises(GenkitError) as caught:
        genkit.load(str(tiny_sd), device="cpu", quantize=spec)
    assert caught.value.param == "quantize" and "\n" not in str(caught.value)
    if message:
        assert message in str(caught.value)


def test_gguf_mistakes_are_one_line(tiny_sd, tiny_flux, tmp_path):
    file = build_tiny_gguf(tiny_flux, tmp_path / "flux.gguf", "Q8_0", layout="diffusers")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    cases = [(dict(name_or_path=str(file)), "base", "pass base FOLDER"),
             (dict(name_or_path=str(tiny_sd), base=str(tiny_flux)), "base", "is not one"),
             (dict(name_or_path=str(fake), base=str(tiny_flux)), "model", "is not a GGUF file"),
             (dict(name_or_path=str(tmp_path / "missing.gguf"), base=str(tiny_flux)), "model", "no such GGUF file"),
             (dict(name_or_path=str(file), base=str(tiny_flux), quantize="int8"), "quantize", "comes quantized from")]
    for kwargs, param, message in cases:
        with pytest.raises(GenkitError) as caught:
            genkit.load(device="cpu", **kwargs)
        assert caught.value.param == param and message in str(caught.value) and "\n" not in str(caught.value)


def test_the_command_line_names_the_flag(tiny_sd, tmp_path):
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(tiny_sd), "--quantize", "int3",
                                       "--device", "cpu", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    error = result.output.splitlines()[-1]
    assert error.startswith("Error: --quantize") and "int3" in error
    assert not (tmp_path / "out").exists()


def test_parse_accepts_the_documented_forms():
    assert quantize.parse("int8") == {"denoiser": "int8"}
    assert quantize.parse("denoiser=int8, text_encoders=fp8") == {"denoiser": "int8", "text_encoders": "fp8"}
    assert quantize.parse({"text_encoder_2": "fp8"}) == {"text_encoder_2": "fp8"}
    assert quantize.parse(None) == {} and quantize.parse("") == {}


def test_the_memory_plan_prices_the_weights_as_loaded(models, tiny_flux, tmp_path):
    """What genkit.quantize loaded (torchao kinds, a GGUF file's block type) is what the plan on CUDA counts."""
    from genkit import memory
    from genkit.loader import _planned_formats

    int8 = genkit.load(str(models["flux"]), device="cpu", quantize="denoiser=int8,text_encoders=fp8")
    formats = _planned_formats(int8.quantization)
    assert formats == {"transformer": "int8", "text_encoder": "fp8", "text_encoder_2": "fp8"}
    gguf = build_tiny_gguf(tiny_flux, tmp_path / "q4.gguf", "Q4_0", layout="diffusers")
    assert _planned_formats(genkit.load(str(gguf), base=str(tiny_flux), device="cpu").quantization) == \
        {"transformer": "q4_k"}  # Q4_0: 18 bytes for 32 weights, 4.5 bits a weight as Q4_K
    sizes = {}
    for quantize in (None, formats):
        plan = memory.plan(str(models["flux"]), device="cuda", memory="1GiB", width=32, height=32, quantize=quantize)
        sizes[bool(quantize)] = {c.name: c.bytes for c in plan.components}
    assert sizes[True]["transformer"] < sizes[False]["transformer"] and sizes[True]["vae"] == sizes[False]["vae"]
