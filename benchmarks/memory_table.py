"""What runs where: genkit.memory's plans for SD 1.5, SDXL, SD3.5 Large and Flux.1-dev at 8-80 GiB, as markdown.

    python benchmarks/memory_table.py [--width 1024] [--height 1024] [--batch-size 1] [--trace]

Plans are made from the published configs alone (genkit.testing.config_folder, no weights), so this runs on any
machine in a minute and needs no GPU: the weights' bytes are counts, the activations estimates, the peaks
predictions (genkit.memory says how each is made). It prints the README's table, the full table of docs/memory.md
and every component's bytes at each dtype and weight-only quantization, headed by the date, machine and versions.

--trace also checks the activation estimates: it runs each denoiser once, the VAE decode and the largest text
encoder on torch's meta device (no memory, no GPU) and records the bytes of the tensors alive at once, attention
through a stand-in for a fused kernel (its output alone, as flash or memory-efficient SDPA allocates), and prints
the estimate beside the traced peak. A trace counts what the model's own code makes; it misses what the kernels
allocate inside (cuDNN and cuBLAS workspaces), which genkit.memory's CUDA allowance covers.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genkit import memory, testing  # noqa: E402

BUDGETS = (8, 12, 16, 24, 80)  # GiB
TITLES = {"sd15": "SD 1.5", "sdxl": "SDXL base", "sd35-large": "SD3.5 Large", "flux-dev": "Flux.1-dev"}


def header() -> str:
    import diffusers
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
               platform.processor() or platform.machine())
    return (f"Generated {datetime.date.today().isoformat()} by `python benchmarks/memory_table.py` on {cpu} "
            f"({platform.system()}, no GPU needed: configs only), python {platform.python_version()}, torch "
            f"{torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}.")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def plans(models: dict, args) -> dict:
    return {name: [memory.plan(model, device="cuda", memory=budget * memory.GiB, width=args.width, height=args.height,
                               batch_size=args.batch_size) for budget in BUDGETS] for name, model in models.items()}


def readme_table(planned: dict) -> str:
    rows = ["| model | weights | " + " | ".join(f"{b} GiB" for b in BUDGETS) + " |",
            "|---|---|" + "---|" * len(BUDGETS)]
    for name, row in planned.items():
        weights = sum(c.bytes for c in row[0].components)
        cells = [f"{p.placement}{'' if p.vae == 'whole' else ' + VAE ' + p.vae}, {p.predicted_peak_bytes / memory.GiB:.1f}"
                 + ("" if p.fits else " (does not fit)") for p in row]
        rows.append(f"| {TITLES[name]} | {weights / memory.GiB:.1f} GiB ({row[0].components[0].dtype}) | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def full_table(planned: dict) -> str:
    rows = ["| model | budget | placement | VAE | batch | text encoding | denoiser step | VAE decode | predicted peak "
            "| fits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in planned.items():
        for budget, p in zip(BUDGETS, row):
            acts = p.activations
            rows.append(f"| {TITLES[name]} | {budget} GiB | {p.placement} | {p.vae} | {p.batch_size} | "
                        f"{memory.gib(acts['text_encoding'])} | {memory.gib(acts['denoiser_step'])} | "
                        f"{memory.gib(acts['vae_decode'])} | {memory.gib(p.predicted_peak_bytes)} | "
                        f"{'yes' if p.fits else 'no'} |")
    return "\n".join(rows)


def formats_table(planned: dict) -> str:
    rows = ["| model | component | class | parameters | " + " | ".join(memory.FORMATS) + " |",
            "|---|---|---|---|" + "---|" * len(memory.FORMATS)]
    for name, row in planned.items():
        for c in row[0].components:
            rows.append(f"| {TITLES[name]} | {c.name} | {c.cls} | {c.parameters:,} | "
                        + " | ".join(memory.gib(c.bytes_by_format[f]) for f in memory.FORMATS) + " |")
    return "\n".join(rows)


# -- --trace: the tensors alive during one forward pass on the meta device --------------------------------------------

def traced_peak(run) -> int:
    """Peak bytes of the storages `run()` makes that are alive at once (a storage lives while any tensor of it
    does, views included), attention replaced by its output alone (a fused kernel's allocation)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.storages = {}  # storage -> [bytes, tensors alive]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            for i, tensor in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
                if not isinstance(tensor, torch.Tensor):
                    continue
                key = tensor.untyped_storage()._cdata
                if key not in self.storages:
                    if i < len(returns) and returns[i].alias_info is not None:
                        continue  # a view of a tensor made before the pass (a weight, an input)
                    self.storages[key] = [tensor.untyped_storage().nbytes(), 0]
                    self.live += self.storages[key][0]
                    self.peak = max(self.peak, self.live)
                self.storages[key][1] += 1
                weakref.finalize(tensor, self.free, key)
            return out

        def free(self, key):
            entry = self.storages[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self.storages[key]

    def fused(query, key, value, *args, **kwargs):
        return torch.empty(query.shape[:-1] + value.shape[-1:], dtype=query.dtype, device=query.device)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        with torch.no_grad(), Peak() as peak:
            run()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return peak.peak


def denoiser_call(module, batch: int, width: int, height: int, tokens: int, dtype):
    """One call of the four denoisers with inputs of their real shapes, on the meta device."""
    import torch

    config = module.config
    empty = lambda *shape: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    h, w = height // 8, width // 8
    kind = type(module).__name__
    if kind == "UNet2DConditionModel":
        extra = {}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": empty(batch, pooled), "time_ids": empty(batch, 6)}}
        return lambda: module(empty(batch, config.in_channels, h, w), empty(batch),
                              encoder_hidden_states=empty(batch, 77, config.cross_attention_dim), **extra)
    if kind == "SD3Transformer2DModel":
        return lambda: module(hidden_states=empty(batch, config.in_channels, h, w),
                              encoder_hidden_states=empty(batch, 77 + tokens, config.joint_attention_dim),
                              pooled_projections=empty(batch, config.pooled_projection_dim), timestep=empty(batch))
    if kind == "FluxTransformer2DModel":
        n = (h // 2) * (w // 2)
        return lambda: module(hidden_states=empty(batch, n, config.in_channels),
                              encoder_hidden_states=empty(batch, tokens, config.joint_attention_dim),
                              pooled_projections=empty(batch, config.pooled_projection_dim), timestep=empty(batch),
                              img_ids=empty(n, 3), txt_ids=empty(tokens, 3), guidance=empty(batch))
    raise ValueError(f"no trace inputs for {kind}")


def trace(models: dict, args) -> str:
    import torch

    from genkit.memory.sizes import _quiet_diffusers

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows = ["| model | what | estimate | traced on the meta device |", "|---|---|---|---|"]
    for name, model in models.items():
        plan = memory.plan(model, device="cuda", memory=80 * memory.GiB, width=args.width, height=args.height)
        dtype = {c.name: dtypes[c.dtype] for c in plan.components}
        by_role = {role: model.component(role) for role in ("denoiser", "vae", "text")}
        tokens = model.family.max_sequence_length or 77
        with _quiet_diffusers():
            for c in model.components:
                c.module.to(dtype[c.name]).eval()
        denoiser, vae = by_role["denoiser"][0], by_role["vae"][0]
        text = max(by_role["text"], key=lambda c: c.parameters)
        text_tokens = min(tokens, getattr(text.module.config, "max_position_embeddings", None) or tokens)
        ids = torch.zeros(1, text_tokens, dtype=torch.long, device="meta")
        latents = torch.empty(1, vae.module.config.latent_channels, args.height // 8, args.width // 8, device="meta",
                              dtype=dtype[vae.name])
        step = denoiser_call(denoiser.module, plan.guidance_passes, args.width, args.height, tokens, dtype[denoiser.name])
        for what, estimate, run in (
                (f"{denoiser.cls}, one step, batch {plan.guidance_passes}", plan.activations["denoiser_step"], step),
                (f"{vae.cls} decode, one image", plan.activations["vae_decode"],
                 lambda: vae.module.decode(latents, return_dict=False)),
                (f"{text.cls} ({text.name}), one prompt of {text_tokens} tokens", plan.activations["text_encoding"],
                 lambda: text.module(input_ids=ids))):
            rows.append(f"| {TITLES[name]} | {what} | {memory.gib(estimate)} | {memory.gib(traced_peak(run))} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="Also trace the activations on the meta device.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: memory.meta_model(str(testing.config_folder(name, Path(tmp) / name))) for name in TITLES}
        planned = plans(models, args)
        print(header(), "\n")
        print(f"Predicted peak in GiB at {args.width}x{args.height}, batch {args.batch_size}, on CUDA:\n")
        print(readme_table(planned), "\n")
        print(full_table(planned), "\n")
        print(formats_table(planned))
        if args.trace:
            print("\n" + trace(models, args))


if __name__ == "__main__":
    main()
