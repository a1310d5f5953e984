"""genkit.memory: plans from configs alone, on the real architectures' config-only folders (genkit.testing.config_folder).

The parameter counts are compared with the published sizes; what genkit.memory counted (diffusers 0.42.1,
transformers 5.25.0, on the meta device, tied weights once):

    SD 1.5 UNet                  859,520,964   (published ~860M)
    SDXL base UNet             2,567,463,684   (~2.6B)
    SD3.5 Large MMDiT          8,056,627,520   (~8.1B)
    Flux.1-dev transformer    11,901,408,320   (~11.9B)
    T5-XXL encoder             4,762,310,656   (~4.76B)
    CLIP-L text                  123,060,480   (~123M; SD3's with its projection 123,650,304)
    OpenCLIP-G text + proj       694,659,840   (~695M)
"""

import json

import pytest
import torch
from click.testing import CliRunner

from genkit import families, memory, testing
from genkit.cli import main
from genkit.errors import GenkitError

GiB = memory.GiB
MiB = 2**20
BUDGETS = (8, 12, 16, 24, 80)  # GiB
PUBLISHED = {  # (architecture, component): published parameter count
    ("sd15", "unet"): 860e6, ("sd15", "text_encoder"): 123e6,
    ("sdxl", "unet"): 2.6e9, ("sdxl", "text_encoder"): 123e6, ("sdxl", "text_encoder_2"): 695e6,
    ("sd35-large", "transformer"): 8.1e9, ("sd35-large", "text_encoder"): 123e6,
    ("sd35-large", "text_encoder_2"): 695e6, ("sd35-large", "text_encoder_3"): 4.76e9,
    ("flux-dev", "transformer"): 11.9e9, ("flux-dev", "text_encoder"): 123e6, ("flux-dev", "text_encoder_2"): 4.76e9,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {name: testing.config_folder(name, root / name) for name in testing.CONFIG_FOLDERS}


@pytest.fixture(scope="module")
def models(folders):
    return {name: memory.meta_model(str(folder)) for name, folder in folders.items()}


def test_a_config_folder_holds_configs_alone(folders):
    files = {p.name for p in folders["flux-dev"].rglob("*") if p.is_file()}
    assert files == {"model_index.json", "config.json"}


def test_parameter_counts_match_the_published_sizes(models):
    for (name, component), published in PUBLISHED.items():
        counted = next(c.parameters for c in models[name].components if c.name == component)
        assert abs(counted - published) <= 0.03 * published, (name, component, counted, published)


def test_counts_on_the_meta_device_are_the_loaded_models_counts(tmp_path):
    """Every diffusers family's tiny model: what the plan counts from its configs is what loading it holds."""
    from diffusers import DiffusionPipeline

    for family in testing.FAMILIES:
        if families.get(family).file_format != "diffusers":
            continue
        folder = testing.build_tiny(family, tmp_path / family)
        # an editing model's processor (no weights) needs torchvision to load, which cannot sit beside a CPU torch
        pipe = DiffusionPipeline.from_pretrained(folder, **({"processor": None} if (folder / "processor").is_dir()
                                                            else {}))
        loaded = {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
                  if isinstance(module, torch.nn.Module)}
        assert {c.name: c.parameters for c in memory.meta_model(str(folder)).components} == loaded, family
        for budget in (1 * MiB, 64 * MiB, GiB):  # every family plans at every budget, within what it predicts
            plan = memory.plan(str(folder), device="cuda", memory=budget, width=64, height=64)
            assert not plan.fits or plan.predicted_peak_bytes <= budget, (family, budget)


@pytest.mark.parametrize("name", list(testing.CONFIG_FOLDERS))
def test_plans_fit_their_budgets_and_more_memory_is_never_slower(models, name):
    ranks = []
    for budget in BUDGETS:
        plan = memory.plan(models[name], device="cuda", memory=f"{budget}GiB", width=1024, height=1024, batch_size=1)
        assert plan.fits and plan.predicted_peak_bytes <= budget * GiB, (name, budget, plan.placement)
        assert plan.batch_size == 1 and plan.budget_bytes == budget * GiB
        ranks.append((list(memory.PLACEMENTS).index(plan.placement), list(memory.VAE_MODES).index(plan.vae)))
    assert ranks == sorted(ranks, reverse=True), (name, ranks)
    assert ranks[-1] == (0, 0)  # 80 GiB holds every one of them whole


def test_the_fastest_placement_that_fits_is_chosen(models):
    """Each placement of the ladder is tried in order: the plan's is the first whose peak fits."""
    plan = memory.plan(models["flux-dev"], device="cuda", memory="12GiB", width=1024, height=1024)
    assert plan.placement == "group-offload"
    faster = [memory.plan(models["flux-dev"], device="cuda", memory=f"{need}GiB", width=1024, height=1024)
              for need in (24, 80)]
    assert [p.placement for p in faster] == ["model-offload", "gpu"]
    assert [c.placement for c in plan.components] == ["cpu; block groups on the gpu"] * 4
    assert plan.guidance_passes == 1  # Flux.1's guidance is distilled: one pass a step
    assert memory.plan(models["sdxl"], device="cuda", memory="80GiB", width=1024, height=1024).guidance_passes == 2


def test_vae_tiling_and_a_smaller_batch_come_when_nothing_else_fits(models):
    tiled = memory.plan(models["sd15"], device="cuda", memory="4GiB", width=2048, height=2048)
    assert tiled.fits and tiled.vae == "tiled"  # SD 1.5's VAE tiles 512 pixels a side
    smaller = memory.plan(models["sd15"], device="cuda", memory="3GiB", width=1024, height=1024, batch_size=8)
    assert smaller.fits and smaller.batch_size < 8 == smaller.asked_batch_size
    none = memory.plan(models["flux-dev"], device="cuda", memory="1GiB", width=1024, height=1024)
    assert not none.fits and none.predicted_peak_bytes > GiB and none.placement == "sequential-offload"


def test_bytes_at_each_dtype_and_quantization(models):
    flux = {c.name: c for c in memory.plan(models["flux-dev"], device="cuda", memory="80GiB").components}
    transformer, t5 = flux["transformer"].bytes_by_format, flux["text_encoder_2"].bytes_by_format
    assert transformer["bf16"] == 2 * flux["transformer"].parameters and transformer["fp32"] == 2 * transformer["bf16"]
    assert transformer["nf4"] == transformer["q4_k"] < transformer["fp8"] == transformer["int8"] < \
        transformer["q8_0"] < transformer["bf16"]
    assert 0.25 < transformer["nf4"] / transformer["bf16"] < 0.3  # 4.5 of 16 bits for nearly every weight
    assert t5["fp16"] > t5["bf16"]  # T5 keeps its `wo` layers in fp32 at fp16
    quantized = memory.plan(models["flux-dev"], device="cuda", memory="12GiB", width=1024, height=1024, quantize="nf4")
    assert quantized.placement == "gpu" and {c.name: c.quantization for c in quantized.components} == \
        {"transformer": "nf4", "vae": None, "text_encoder": "nf4", "text_encoder_2": "nf4"}


def test_group_offload_groups_are_diffusers_blocks(models):
    flux = next(c for c in models["flux-dev"].components if c.role == "denoiser")
    assert len(flux.groups) == 19 + 38  # the double- and single-stream blocks
    t5 = next(c for c in models["flux-dev"].components if c.name == "text_encoder_2")
    assert not t5.groups  # no ModuleList at its top: diffusers onloads it whole


def test_budgets_and_refusals(models):
    assert memory.parse_bytes("12GiB") == 12 * GiB and memory.parse_bytes("24 GB") == 24 * 10**9
    assert memory.parse_bytes("512MiB") == 512 * 2**20 and memory.parse_bytes("1.5gib") == int(1.5 * GiB)
    for bad in ("12", "twelve GiB", "-1GiB", "0GiB", "12 GiBs"):
        with pytest.raises(GenkitError) as refused:
            memory.parse_bytes(bad)
        assert refused.value.param == "memory"
    flux = models["flux-dev"]
    for kwargs, param in ((dict(dtype="fp16"), "dtype"), (dict(width=1000), "width"), (dict(device="tpu"), "device"),
                          (dict(quantize="nf3"), "quantize"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(GenkitError) as refused:
            memory.plan(flux, **{"device": "cuda", "memory": "12GiB", **kwargs})
        assert refused.value.param == param
    if not torch.cuda.is_available():
        with pytest.raises(GenkitError) as refused:
            memory.plan(flux, device="cuda")
        assert refused.value.param == "memory"


def test_genkit_info_plans_from_a_folder_of_configs(folders):
    result = CliRunner().invoke(main, ["info", "--model", str(folders["flux-dev"]), "--device", "cuda",
                                       "--memory", "12GiB", "--width", "1024", "--height", "1024", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert {"components", "placement", "predicted_peak_bytes", "fits"} <= set(plan)
    assert plan["fits"] and plan["predicted_peak_bytes"] <= 12 * GiB
    assert {c["name"]: c["class"] for c in plan["components"]}["transformer"] == "FluxTransformer2DModel"
    text = CliRunner().invoke(main, ["info", "-m", str(folders["sdxl"]), "--device", "cuda", "--memory", "8GiB"])
    assert text.exit_code == 0, text.output
    assert "UNet2DConditionModel" in text.output and "predicted of 8.0 GiB" in text.output
    refused = CliRunner().invoke(main, ["info", "--memory", "12GiB"])
    assert refused.exit_code == 2 and "--model" in refused.output


def test_a_hub_id_is_planned_from_its_cached_configs_alone(folders, tmp_path, monkeypatch):
    """Only model_index.json and the config.json files are read from the hub (here its cache, offline)."""
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--flux-configs" / "snapshots" / ("0" * 40)
    shutil.copytree(folders["flux-dev"], snapshot)
    (tmp_path / "models--someone--flux-configs" / "refs").mkdir()
    (tmp_path / "models--someone--flux-configs" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    plan = memory.plan("someone/flux-configs", device="cuda", memory="24GiB", width=1024, height=1024)
    assert plan.family == "flux" and plan.placement == "model-offload"
    with pytest.raises(GenkitError, match="network or a filled local cache"):
        memory.plan("someone/not-cached", device="cuda", memory="24GiB")
