"""LoRA files as files: `genkit lora inspect` on every layout, and `genkit lora export --format kohya`, whose file
genkit's own `--lora` path (and plain diffusers) load back to the same image."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import genkit
from genkit import lora
from genkit.lora import files as lora_files
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.testing import build_tiny
from genkit.train.lora import train_lora
from tests.test_lora import FAST, make_dataset

PROMPT = "a red square"
TRIGGER = "zwx square"
WORD = "zwx"  # the trigger word found in the captions (the word the text encoder does not know)
MIXED = 'lora.target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1"]'  # attention, feed-forward, conv


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The six squares in a kohya folder `1_zwx square`: no captions, so the folder names the trigger words."""
    root = tmp_path_factory.mktemp("data") / "squares"
    folder = make_dataset(root / f"1_{TRIGGER}", captions=False)
    assert len(list(folder.glob("*.png"))) == 6
    return root


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny("sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


def trained(data, model, out, *extra) -> Path:
    """A LoRA trained 3 steps at a learning rate high enough to change images (rank 4, alpha 8: scale 2)."""
    train_lora(data, out, model=str(model), progress=False,
               overrides=[*FAST, "train.steps=3", "train.batch_size=2", "train.gradient_accumulation_steps=1",
                          "train.learning_rate=5e-2", "validation.every=0", "lora.rank=4", "lora.alpha=8", *extra])
    return Path(out)


@pytest.fixture(scope="module")
def loras(dataset, tiny_sd, tiny_mini, tiny_sdxl, tmp_path_factory):
    """{family: (model folder, LoRA folder)}: attention only on SD; attention, feed-forward and convolution layers
    on SDXL and genkit-mini."""
    runs = tmp_path_factory.mktemp("runs")
    return {"sd": (tiny_sd, trained(dataset, tiny_sd, runs / "sd-lora")),
            "sdxl": (tiny_sdxl, trained(dataset, tiny_sdxl, runs / "sdxl-lora", MIXED)),
            "genkit-mini": (tiny_mini, trained(dataset, tiny_mini, runs / "mini-lora", MIXED))}


def image(model, *specs, seed=3):
    pipeline = genkit.load(str(model), device="cpu")
    lora.apply(pipeline, [lora.parse_spec(str(s)) for s in specs])
    return np.asarray(pipeline.generate([PROMPT], seed=seed, num_inference_steps=2).images[0]).astype(int)


def weights(folder: Path) -> dict:
    return load_file(str(folder / lora.WEIGHTS_NAME))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- inspect -----------------------------------------------------------------------------------


def test_inspect_a_genkit_lora_in_diffusers_layout(loras, dataset):
    model, folder = loras["sd"]
    n = len(lora.layer_names(weights(folder)))
    info = lora_files.inspect_lora(folder)
    assert info.format == "diffusers" and info.path == folder / lora.WEIGHTS_NAME
    assert info.components == {"unet": n} and info.ranks == {4: n} and info.alphas == {"8": n}
    assert info.targets == {"unet": {f"attn{i}.{p}": n // 8 for i in (1, 2) for p in ("to_q", "to_k", "to_v",
                                                                                       "to_out.0")}}
    assert info.base_model == str(model) and info.family == "sd" and info.trigger_words == [WORD]
    assert info.training["steps"] == 3 and info.training["learning_rate"] == 5e-2 and info.training["images"] == 6
    assert info.record == str(folder / "genkit_lora.json") and info.matched is None
    text = lora_files.format_info(info)
    for line in ("format         diffusers", f"layers         unet {n}", "rank           4", "alpha          8",
                 f"trigger words  {WORD}", "targets unet   attn1.to_k x4"):
        assert line in text, text


def test_inspect_counts_every_kind_of_layer(loras):
    _, folder = loras["genkit-mini"]
    info = lora_files.inspect_lora(folder)
    kinds = info.targets["unet"]
    assert {"attn1.to_q", "attn2.to_out.0", "ff.net.2", "conv1"} <= set(kinds)
    assert sum(kinds.values()) == len(lora.layer_names(weights(folder))) == info.components["unet"]


def test_inspect_peft_layout(loras, tmp_path):
    """The same adapter with peft's lora_A/lora_B names and diffusers' header: same layers, ranks and alphas."""
    model, folder = loras["sd"]
    source = folder / lora.WEIGHTS_NAME
    with safe_open(str(source), "pt") as f:
        header = f.metadata()
    file = tmp_path / "peft.safetensors"
    save_file(lora.peft_layout(weights(folder)), str(file), metadata=header)
    peft, diffusers = lora_files.inspect_lora(file, model=str(model)), lora_files.inspect_lora(folder)
    assert peft.format == "peft" and diffusers.format == "diffusers"
    assert (peft.components, peft.ranks, peft.alphas, peft.targets) == \
        (diffusers.components, diffusers.ranks, diffusers.alphas, diffusers.targets)
    assert peft.record is None and peft.training == {}  # no record beside a file of another name
    assert (peft.matched, peft.wanted) == (diffusers.components["unet"],) * 2


def test_inspect_a_transformer_lora_in_peft_layout(dataset, tmp_path):
    """A transformer family's LoRA as genkit (and diffusers' SD3/Flux scripts) write it: peft names, `transformer.`
    keys; it fits its model, and kohya export refuses it in one line."""
    model = build_tiny("sd3", tmp_path / "tiny-sd3")
    folder = trained(dataset, model, tmp_path / "sd3-lora")
    n = len(lora.layer_names(weights(folder)))
    info = lora_files.inspect_lora(folder, model=str(model))
    assert info.format == "peft" and info.components == {"transformer": n} and n > 0
    assert info.ranks == {4: n} and info.alphas == {"8": n} and info.family == "sd3"
    assert sum(info.targets["transformer"].values()) == n and "attn.to_q" in info.targets["transformer"]
    assert (info.matched, info.wanted) == (n, n)
    message = one_line_error(run("lora", "export", folder, "--out", tmp_path / "sd3.safetensors"))
    assert "transformer adapters (model family: sd3); kohya export covers the families whose layer names" in message


def test_inspect_a_kohya_file_from_sd_scripts(loras, tmp_path):
    """A file as kohya's sd-scripts writes one: alpha 1 at rank 4, ss_* fields, a `10_sks dog` dataset folder."""
    from tests.test_lora import kohya_copy

    model, folder = loras["sd"]
    file = kohya_copy(folder, tmp_path / "plain.safetensors")  # test_lora's own conversion, not genkit's
    tensors = {k: (torch.tensor(1.0) if k.endswith(".alpha") else v) for k, v in load_file(str(file)).items()}
    header = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1",
              "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_base_model_version": "sd_v1",
              "ss_learning_rate": "0.0001", "ss_max_train_steps": "1600", "ss_num_train_images": "20",
              "ss_dataset_dirs": json.dumps({"10_sks dog": {"n_repeats": 10, "img_count": 20}}),
              "ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 20, "grass": 3}})}
    save_file(tensors, str(file), metadata=header)
    info = lora_files.inspect_lora(file, model=str(model))
    n = len(lora.layer_names(weights(folder)))
    assert info.format == "kohya" and info.components == {"unet": n} and info.ranks == {4: n}
    assert info.alphas == {"1": n} and info.trigger_words == ["sks dog"]
    assert info.base_model == "v1-5-pruned-emaonly.safetensors" and info.family == "sd_v1"
    assert info.training["learning_rate"] == "0.0001" and info.training["max_train_steps"] == "1600"
    assert (info.matched, info.wanted) == (n, n)


def test_model_match_counts(loras):
    sd_model, sd_folder = loras["sd"]
    mini_model, _ = loras["genkit-mini"]
    n = len(lora.layer_names(weights(sd_folder)))
    fits = lora_files.inspect_lora(sd_folder, model=str(sd_model))
    assert (fits.matched, fits.wanted, fits.miss) == (n, n, None)
    other = lora_files.inspect_lora(sd_folder, model=str(mini_model))  # trained for another base
    assert other.wanted == n and other.matched < n and other.miss
    result = run("lora", "inspect", sd_folder, "--model", mini_model)
    assert result.exit_code == 0, result.output
    assert f"{other.matched} of {n} layers match (does not fit; first that did not: {other.miss})" in result.output
    result = run("lora", "inspect", sd_folder, "--model", sd_model, "--json")
    data = json.loads(result.stdout)
    assert (data["matched"], data["wanted"], data["format"], data["ranks"]) == (n, n, "diffusers", {"4": n})


# --- export to kohya ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl", "genkit-mini"])
def test_kohya_export_gives_the_same_image(family, loras, tmp_path):
    model, folder = loras[family]
    file = tmp_path / f"{family}.safetensors"
    result = run("lora", "export", folder, "--format", "kohya", "--out", file)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(file)
    source = weights(folder)
    kohya = load_file(str(file))
    n = len(lora.layer_names(source))
    assert len(kohya) == 3 * n and all(k.startswith("lora_unet_") for k in kohya)
    assert {k.rpartition(".lora_")[0] or k.removesuffix(".alpha") for k in kohya} == \
        {"lora_unet_" + layer.removeprefix("unet.").replace(".", "_") for layer in lora.layer_names(source)}
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    for key, value in source.items():  # every tensor copied unchanged
        layer, _, kind = key.removeprefix("unet.").rpartition(".lora.")
        name = "lora_unet_" + layer.replace(".", "_") + (".lora_down.weight" if kind.startswith("down") else
                                                         ".lora_up.weight")
        assert torch.equal(kohya[name], value)
    original, exported, base = image(model, folder), image(model, file), image(model)
    assert np.abs(original - base).max() > 20  # the adapter visibly changes the image...
    assert np.array_equal(exported, original)  # ...and the kohya file gives the same pixels (measured: equal)


def test_kohya_header(loras, tmp_path):
    model, folder = loras["sdxl"]
    file = lora_files.export_kohya(folder, tmp_path / "style.safetensors").path
    with safe_open(str(file), "pt") as f:
        header = f.metadata()
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "8")
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_v2"] == "False"
    assert header["ss_sd_model_name"] == str(model) and header["ss_output_name"] == "style"
    assert "genkit" in header["ss_training_comment"] and header["ss_max_train_steps"] == "3"
    assert json.loads(header["ss_tag_frequency"]) == {"squares": {WORD: 1}}
    assert json.loads(header["genkit_lora"]) == json.loads((folder / "genkit_lora.json").read_text())
    raw = file.read_bytes()  # kohya's sshs_model_hash: sha256 of everything after the header
    assert header["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    info = lora_files.inspect_lora(file)  # the record travels in the header
    assert info.format == "kohya" and info.record == "header" and info.trigger_words == [WORD]
    assert info.base_model == str(model) and info.training["steps"] == 3
    sd = lora_files.export_kohya(loras["sd"][1], tmp_path / "sd.safetensors")
    mini = lora_files.export_kohya(loras["genkit-mini"][1], tmp_path / "mini.safetensors")
    assert (sd.base_version, mini.base_version) == ("sd_v1", "genkit-mini")


def test_plain_diffusers_loads_the_kohya_file(loras, tmp_path):
    """diffusers' own loader (what ComfyUI-like tools do with lora_unet_ keys) takes every layer and makes the image
    genkit makes with the original folder."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, folder = loras["sdxl"]
    file = lora_files.export_kohya(folder, tmp_path / "k.safetensors").path
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(file))
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == len(lora.layer_names(weights(folder)))
    ours = image(model, folder)
    theirs = pipe([PROMPT], num_inference_steps=2, guidance_scale=5.0, generator=[torch.Generator().manual_seed(3)],
                  width=ours.shape[1], height=ours.shape[0]).images[0]
    assert np.abs(np.asarray(theirs).astype(int) - ours).max() <= 1  # measured: equal or 1 level of 255


def test_text_encoder_layers_export_under_kohyas_te_names(loras, tmp_path):
    """Text-encoder adapters (genkit trains them where peft allows; CLIP's four attention projections) become
    lora_te_... and read back whole; their fit is checked against the model's text encoder."""
    model, folder = loras["sd"]
    hidden = json.loads((Path(model) / "text_encoder" / "config.json").read_text())["hidden_size"]
    tensors = dict(weights(folder))
    layers = [f"text_encoder.text_model.encoder.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj",
                                                                                  "out_proj")]
    for layer in layers:
        tensors[f"{layer}.lora_linear_layer.down.weight"] = torch.randn(4, hidden)
        tensors[f"{layer}.lora_linear_layer.up.weight"] = torch.randn(hidden, 4)
    src = tmp_path / "te"
    src.mkdir()
    save_file(tensors, str(src / lora.WEIGHTS_NAME))
    result = lora_files.export_kohya(src, tmp_path / "te.safetensors", model=str(model))  # --model: fit checked
    kohya = load_file(str(result.path))
    for layer in layers:
        name = "lora_te_" + layer.removeprefix("text_encoder.").replace(".", "_")
        assert torch.equal(kohya[f"{name}.lora_down.weight"], tensors[f"{layer}.lora_linear_layer.down.weight"])
        assert torch.equal(kohya[f"{name}.lora_up.weight"], tensors[f"{layer}.lora_linear_layer.up.weight"])
        assert float(kohya[f"{name}.alpha"]) == 4.0  # no adapter header: diffusers' loader uses alpha = rank
    info = lora_files.inspect_lora(result.path, model=str(model))
    assert info.components["text_encoder"] == 4 and info.matched == info.wanted == result.layers


# --- bad input ---------------------------------------------------------------------------------


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "empty folder", "not safetensors", "pickle", "no lora keys",
                                  "two files"])
def test_inspect_bad_input(case, tmp_path):
    path = tmp_path / "x.safetensors"
    if case == "empty folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "not safetensors":
        path.write_text("this is not a safetensors file")
    elif case == "pickle":
        path = tmp_path / "x.bin"
        torch.save({"a.lora_A.weight": torch.zeros(1)}, path)
    elif case == "no lora keys":
        save_file({"conv.weight": torch.zeros(2, 2)}, str(path))
    elif case == "two files":
        path = tmp_path / "folder"
        path.mkdir()
        for name in ("a", "b"):
            save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(path / f"{name}.safetensors"))
    expected = {"missing": "no such file or folder", "empty folder": "no .safetensors file",
                "not safetensors": "not a valid safetensors file", "pickle": "not a .safetensors file",
                "no lora keys": "holds no LoRA weights", "two files": "2 .safetensors files"}[case]
    assert expected in one_line_error(run("lora", "inspect", path))


def test_export_refusals(loras, tmp_path):
    _, folder = loras["sd"]
    done = tmp_path / "done.safetensors"
    assert run("lora", "export", folder, "--out", done).exit_code == 0
    assert "already exists (pass --overwrite" in one_line_error(run("lora", "export", folder, "--out", done))
    assert run("lora", "export", folder, "--out", done, "--overwrite").exit_code == 0
    again = run("lora", "export", done, "--out", tmp_path / "b.safetensors")
    assert "already in kohya's layout" in one_line_error(again)
    assert "must end in .safetensors" in one_line_error(run("lora", "export", folder, "--out", tmp_path / "k.pt"))
    transformer = tmp_path / "flux.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(transformer))
    message = one_line_error(run("lora", "export", transformer, "--out", tmp_path / "f.safetensors"))
    from genkit import families

    exportable = ", ".join(f.name for f in families.all_families() if f.kohya is not None)
    assert {"sd", "sdxl", "genkit-mini", "flux", "qwen-image", "z-image"} <= set(exportable.split(", "))
    assert f"kohya and ComfyUI are known to use ({exportable})" in message
    assert "model family: not known: pass --model" in message  # a transformer component names no family
    mini_model = loras["genkit-mini"][0]
    message = one_line_error(run("lora", "export", folder, "--out", tmp_path / "m.safetensors", "--model", mini_model))
    assert "does not fit" in message and not (tmp_path / "m.safetensors").exists()
    with pytest.raises(GenkitError, match="no such file or folder"):
        lora_files.export_kohya(tmp_path / "nothing", tmp_path / "n.safetensors")


# --- transformer families: kohya's and ComfyUI's names of the original models --------------------------------


FLUX_WIDTH, RANK = 3072, 4  # Flux.1's width: diffusers' kohya converter splits a single block's linear1 at it


def flux_lora(folder: Path, alpha: float = 8.0) -> Path:
    """A Flux.1-wide LoRA (rank 4, alpha 8: scale 2) on every kind of layer kohya's names know: fused q/k/v (one
    block's only partly adapted), a single block's q/k/v (fused with its MLP input, not adapted), plain layers, the
    final norm (whose shift and scale rows the original holds the other way round) and the output projection."""
    g = torch.Generator().manual_seed(0)
    tensors = {}

    def pair(name, out, width=FLUX_WIDTH):
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, width, generator=g) / 10
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out, RANK, generator=g) / 10

    for layer in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        pair(f"transformer_blocks.0.attn.{layer}", FLUX_WIDTH)
    pair("transformer_blocks.1.attn.to_k", FLUX_WIDTH)
    pair("transformer_blocks.0.ff.net.0.proj", 4 * FLUX_WIDTH)
    pair("transformer_blocks.0.norm1.linear", 6 * FLUX_WIDTH)
    for layer in ("to_q", "to_k", "to_v"):
        pair(f"single_transformer_blocks.0.attn.{layer}", FLUX_WIDTH)
    pair("single_transformer_blocks.0.proj_out", FLUX_WIDTH, width=5 * FLUX_WIDTH)
    pair("norm_out.linear", 2 * FLUX_WIDTH)
    pair("proj_out", 64)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": alpha,
                                                   "transformer.peft_type": "LORA"})}
    save_file(tensors, str(folder / lora.WEIGHTS_NAME), metadata=header)
    (folder / "genkit_lora.json").write_text(json.dumps({"family": "flux"}))
    return folder


def updates(state: dict, scale: float = 1.0) -> dict:
    """{layer: scale * B @ A @ probe} of a peft-named state dict (`transformer.` prefix optional): the update applied
    to a fixed random probe of its inputs (the updates themselves are up to 21,504 x 3,072)."""
    pairs = {}
    for key, value in state.items():
        if match := re.match(r"^(?:transformer\.)?(.*)\.lora_([AB])\.weight$", key):
            pairs.setdefault(match.group(1), {})[match.group(2)] = value.double()
    probes = {}
    for name, pair in pairs.items():
        width = pair["A"].shape[1]
        probe = probes.setdefault(width, torch.randn(width, 4, generator=torch.Generator().manual_seed(width),
                                                     dtype=torch.float64))
        pairs[name] = scale * (pair["B"] @ (pair["A"] @ probe))
    return pairs


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_flux_export_round_trips_through_diffusers_converters(layout, tmp_path):
    """The export is the inverse of diffusers' _convert_kohya_flux_lora_to_diffusers: its Flux loader reads the file back
    to every layer's update (alpha / rank 2 multiplied in), the parts of a fused layer that were not adapted as zero."""
    from diffusers.loaders import FluxLoraLoaderMixin

    src = flux_lora(tmp_path / "src")
    result = lora_files.export_kohya(src, tmp_path / f"{layout}.safetensors", layout=layout)
    exported = load_file(str(result.path))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv" if layout == "kohya" else \
        "diffusion_model.double_blocks.0.img_attn.qkv"
    assert exported[f"{qkv}.lora_down.weight"].shape == (3 * RANK, FLUX_WIDTH)  # the three downs stacked
    assert exported[f"{qkv}.lora_up.weight"].shape == (3 * FLUX_WIDTH, 3 * RANK)  # the ups block-diagonal
    assert float(exported[f"{qkv}.alpha"]) == 3 * RANK  # scale 1: alpha / rank is in the ups
    linear1 = "lora_unet_single_blocks_0_linear1" if layout == "kohya" else "diffusion_model.single_blocks.0.linear1"
    assert exported[f"{linear1}.lora_up.weight"].shape == (7 * FLUX_WIDTH, 4 * RANK)  # q, k, v and the MLP's 4x
    assert all(k.startswith("lora_unet_" if layout == "kohya" else "diffusion_model.") for k in exported)
    assert (result.layers, result.base_version) == (11, "flux1")
    read = FluxLoraLoaderMixin.lora_state_dict(dict(exported))
    expected, back = updates(load_file(str(src / lora.WEIGHTS_NAME)), scale=2.0), updates(read)
    for name, update in expected.items():
        assert torch.allclose(back.pop(name), update, rtol=1e-5, atol=1e-9), name
    assert set(back) == {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_v",
                         "single_transformer_blocks.0.proj_mlp"}  # the parts no one adapted...
    assert all(update.abs().max() == 0 for update in back.values())  # ...read back as zero


def test_flux_export_refuses_what_its_layouts_cannot_hold(tmp_path):
    src = flux_lora(tmp_path / "src")
    tensors = load_file(str(src / lora.WEIGHTS_NAME))
    tensors["transformer.transformer_blocks.0.attn.norm_q.lora_A.weight"] = torch.zeros(RANK, 128)
    tensors["transformer.transformer_blocks.0.attn.norm_q.lora_B.weight"] = torch.zeros(128, RANK)
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file(tensors, str(odd / lora.WEIGHTS_NAME), metadata={"lora_adapter_metadata": "{}"})
    (odd / "genkit_lora.json").write_text(json.dumps({"family": "flux"}))
    with pytest.raises(GenkitError, match="transformer_blocks.0.attn.norm_q has no counterpart in Flux.1's original"):
        lora_files.export_kohya(odd, tmp_path / "odd.safetensors")
    with pytest.raises(GenkitError, match="exports to kohya and comfyui, not a1111"):
        lora_files.export_kohya(src, tmp_path / "x.safetensors", layout="a1111")


TRANSFORMERS = ["flux", "chroma", "qwen-image", "z-image", "flux2-klein"]
# Flux's and Chroma's tiny single blocks are 32 wide, and diffusers' kohya converter splits linear1 at Flux.1's 3072:
# their tiny LoRAs adapt the double blocks (the synthetic test above has the single blocks at full width)
DOUBLE_ONLY = 'lora.target_modules=["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", ' \
              '"transformer_blocks.0.attn.to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", ' \
              '"ff.net.0.proj"]'


@pytest.fixture(scope="module")
def transformer_loras(dataset, tmp_path_factory):
    """family -> (tiny model, its LoRA trained 3 steps at 32 px, its table's targets; rank 4, alpha 8)."""
    root, made = tmp_path_factory.mktemp("transformers"), {}

    def get(family):
        if family not in made:
            model = build_tiny(family, root / "models" / family)
            extra = [DOUBLE_ONLY] if family in ("flux", "chroma") else []
            made[family] = (model, trained(dataset, model, root / family, "data.resolution=32", "prior.source=none",
                                           *extra))
        return made[family]
    return get


def image32(model, *specs):
    pipeline = genkit.load(str(model), device="cpu")
    lora.apply(pipeline, [lora.parse_spec(str(s)) for s in specs])
    return np.asarray(pipeline.generate([PROMPT], seed=3, num_inference_steps=2, width=32,
                                        height=32).images[0]).astype(int)


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_transformer_exports_give_the_same_image(family, transformer_loras, tmp_path):
    """Each layout the family exports to, loaded back through genkit's --lora path (diffusers' loader for the
    family, its kohya/ComfyUI converter), makes the image the trained folder makes."""
    from genkit import families

    model, folder = transformer_loras(family)
    original, base = image32(model, folder), image32(model)
    assert np.abs(original - base).max() > 2  # the adapter changes the image
    for layout in families.get(family).kohya.layouts:
        result = run("lora", "export", folder, "--out", tmp_path / f"{layout}.safetensors") if layout == "kohya" \
            else None
        if result is not None:
            assert result.exit_code == 0, result.output
        file = lora_files.export_kohya(folder, tmp_path / f"{layout}.safetensors", layout=layout, overwrite=True).path
        keys = load_file(str(file))
        assert all(k.startswith("lora_unet_" if layout == "kohya" else "diffusion_model.") for k in keys)
        assert np.array_equal(image32(model, file), original), layout  # measured: equal on every family and layout
        info = lora_files.inspect_lora(file)
        assert info.record == "header" and info.family == family


def test_tiny_flux_single_blocks_are_refused_in_one_line(dataset, tmp_path):
    """diffusers' converter reads a single block's linear1 only at Flux.1's width: at any other the export says so."""
    model = build_tiny("flux", tmp_path / "flux")
    folder = trained(dataset, model, tmp_path / "run", "data.resolution=32", "prior.source=none")
    message = one_line_error(run("lora", "export", folder, "--out", tmp_path / "f.safetensors"))
    assert "diffusers' FluxLoraLoaderMixin cannot read the file back" in message and "not exported" in message
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("setting, message", [("lora.dora=true", "is a DoRA adapter; kohya's and ComfyUI's LoRA "
                                                                  "layouts have no magnitude vectors"),
                                              ("lora.adapter=lokr", "holds a LoKr adapter (peft's factors)"),
                                              ("lora.adapter=loha", "holds a LoHa adapter (peft's factors)")])
def test_dora_lokr_and_loha_exports_are_refused_in_one_line(setting, message, dataset, tiny_sd, tmp_path):
    folder = trained(dataset, tiny_sd, tmp_path / "run", setting, "prior.source=none")
    assert message in one_line_error(run("lora", "export", folder, "--out", tmp_path / "k.safetensors"))
