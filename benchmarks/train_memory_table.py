"""LoRA training's memory plans: SDXL, Flux.1-dev, Z-Image and Qwen-Image at 1024, rank 16, batch 1, at 12-24 GiB.

    python benchmarks/train_memory_table.py [--resolution 1024] [--rank 16] [--batch-size 1] [--budgets 12 16 24]

Plans are made from the published configs alone (no weights; genkit.testing.config_folder for SDXL and Flux.1-dev,
the Z-Image-Turbo and Qwen-Image configs below), so this runs on any machine in a minute and needs no GPU. The
run planned is each family's recipe (configs/lora.toml: its rank and target modules, here at --rank), 20 images and
captions cached, validation grids of 4 prompts on, and every optional package (bitsandbytes, torchao) assumed
installed, as on a CUDA machine with `pip install "genkit[quant]" bitsandbytes`. Weights, adapters, gradients and
optimizer states are counted; activations are estimates (genkit.memory.training); nothing was run on a GPU.

Qwen-Image, where genkit has no family for it yet, is planned with `genkit.memory.training.from_configs` from its
pipeline's configs (its 20B MMDiT, Qwen2.5-VL-7B text encoder and video VAE): Flux's adapter targets, 512-token
captions, classifier-free guidance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genkit import testing  # noqa: E402
from genkit.memory import training  # noqa: E402
from genkit.memory.sizes import GiB, gib  # noqa: E402
from genkit.train.recipe import resolve  # noqa: E402

TITLES = {"sdxl": "SDXL base", "flux-dev": "Flux.1-dev", "z-image": "Z-Image (Turbo)", "qwen-image": "Qwen-Image"}
FAMILIES = {"qwen-image": "flux"}  # whose recipe a model genkit has no family for uses

_VAE_16 = testing.CONFIG_FOLDERS["flux-dev"][1]["vae"][2]
_Z_IMAGE = {  # Tongyi-MAI/Z-Image-Turbo
    "_class_name": "ZImagePipeline",
    "transformer": ("diffusers", "ZImageTransformer2DModel", dict(
        _class_name="ZImageTransformer2DModel", all_f_patch_size=[1], all_patch_size=[2], axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512], cap_feat_dim=2560, dim=3840, in_channels=16, n_heads=30, n_kv_heads=30,
        n_layers=30, n_refiner_layers=2, norm_eps=1e-05, qk_norm=True, rope_theta=256.0, t_scale=1000.0)),
    "text_encoder": ("transformers", "Qwen3Model", dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=128,
        hidden_act="silu", hidden_size=2560, intermediate_size=9728, max_position_embeddings=40960,
        num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8, rms_norm_eps=1e-06,
        rope_theta=1000000.0, tie_word_embeddings=True, vocab_size=151936)),
    "vae": ("diffusers", "AutoencoderKL", dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159)),
    "tokenizer": ("transformers", "Qwen2Tokenizer", None),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", None),
}
_QWEN_IMAGE = {  # Qwen/Qwen-Image
    "_class_name": "QwenImagePipeline",
    "transformer": ("diffusers", "QwenImageTransformer2DModel", dict(
        _class_name="QwenImageTransformer2DModel", attention_head_dim=128, axes_dims_rope=[16, 56, 56],
        guidance_embeds=False, in_channels=64, joint_attention_dim=3584, num_attention_heads=24, num_layers=60,
        out_channels=16, patch_size=2)),
    "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", tie_word_embeddings=False,
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        text_config=dict(model_type="qwen2_5_vl_text", hidden_act="silu", hidden_size=3584, intermediate_size=18944,
                         max_position_embeddings=128000, max_window_layers=28, num_attention_heads=28,
                         num_hidden_layers=28, num_key_value_heads=4, rms_norm_eps=1e-06, rope_theta=1000000.0,
                         rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                         vocab_size=152064, tie_word_embeddings=False),
        vision_config=dict(model_type="qwen2_5_vl", depth=32, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                           hidden_size=1280, in_channels=3, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                           window_size=112))),
    "vae": ("diffusers", "AutoencoderKLQwenImage", dict(
        _class_name="AutoencoderKLQwenImage", attn_scales=[], base_dim=96, dim_mult=[1, 2, 4, 4], dropout=0.0,
        num_res_blocks=2, temperal_downsample=[False, True, True], z_dim=16)),
    "tokenizer": ("transformers", "Qwen2Tokenizer", None),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", None),
}


def write_folder(spec: dict, folder: Path) -> Path:
    """A folder of configs alone (model_index.json and each model's config.json), as genkit.testing.config_folder."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": spec["_class_name"], "_diffusers_version": "0.42.1"}
    for name, entry in spec.items():
        if name.startswith("_"):
            continue
        library, cls, config = entry
        index[name] = [library, cls]
        if config is not None:
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def models(root: Path) -> dict:
    """name -> what plan_training takes (a folder of a known family, or a TrainingModel)."""
    return {"sdxl": str(testing.config_folder("sdxl", root / "sdxl")),
            "flux-dev": str(testing.config_folder("flux-dev", root / "flux-dev")),
            "z-image": str(write_folder(_Z_IMAGE, root / "z-image")),
            "qwen-image": _qwen_image(write_folder(_QWEN_IMAGE, root / "qwen-image"))}


def _qwen_image(folder: Path):
    """Its genkit family's plan once genkit has one; until then from its configs alone."""
    from genkit.errors import GenkitError

    try:
        return training.training_model(str(folder))
    except GenkitError:
        return training.from_configs(folder, text_tokens=512)


def run_of(name: str, model, args) -> training.LoraRun:
    """The family's recipe (configs/lora.toml) at --rank; a model genkit has no family for takes Flux's targets."""
    from genkit import families

    known = isinstance(model, str) or model.family in families.names()
    family = training.training_model(model).family if known else FAMILIES[name]
    recipe = resolve(None, (), family=family)
    return training.LoraRun(resolution=args.resolution, batch_size=args.batch_size, rank=args.rank,
                            target_modules=tuple(recipe.lora.target_modules), validation_prompts=4, images=20,
                            captions=20)


def plans(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: [training.plan_training(model, run_of(name, model, args), device="cuda", memory=budget * GiB,
                                              available={"bitsandbytes", "torchao"}) for budget in args.budgets]
                for name, model in models(Path(tmp)).items()}


def table(planned: dict, budgets) -> str:
    rows = ["| model | weights (bf16) | " + " | ".join(f"{b} GiB" for b in budgets) + " |",
            "|---|---|" + "---|" * len(budgets)]
    for name, row in planned.items():
        weights = sum(c.bytes_by_format["bf16"] for c in row[0].components)
        cells = [f"{gib(p.predicted_peak_bytes)}: {p.label()}" if p.fits else
                 f"does not fit (needs {gib(p.smallest_budget_bytes)})" for p in row]
        rows.append(f"| {TITLES[name]} | {gib(weights)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--budgets", type=int, nargs="+", default=[12, 16, 24], help="GiB")
    parser.add_argument("--details", action="store_true", help="Also print every plan as --dry-run does.")
    args = parser.parse_args()
    planned = plans(args)
    import diffusers
    import torch

    print(f"Generated {datetime.date.today().isoformat()} by `python benchmarks/train_memory_table.py` "
          f"({platform.machine()}, no GPU: configs only), torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}; {args.resolution}x{args.resolution}, rank {args.rank}, batch {args.batch_size}.\n")
    print(table(planned, args.budgets))
    for name, row in planned.items():
        for plan in row:
            print(f"\n{TITLES[name]} at {gib(plan.budget_bytes)}: {plan.reason}")
            if args.details:
                print(training.describe(plan))


if __name__ == "__main__":
    main()
