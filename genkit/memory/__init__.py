"""A memory plan, made before loading: what a model needs on a device, and the fastest placement that fits.

Today's models do not fit the GPUs people own (Flux.1-dev: a 12B transformer, 22 GiB in bf16, and a 4.8B T5). This
module answers, from the model's configs alone, what each component weighs at each dtype and weight-only
quantization, what one denoising step and the VAE decode need on top, and which placement (everything on the GPU,
text encoders off it after encoding, diffusers' model, group or sequential offload, VAE slicing and tiling, a
smaller batch) is the fastest that fits a budget. Nothing is downloaded but configs and no weight is read: each
component is built on torch's meta device (shapes without storage), so a folder with only model_index.json and
each component's config.json is enough, on any machine (`genkit info --model M --device cuda --memory 12GiB`).

What is counted and what is estimated:

- **Weights are counted**: every parameter of every component at the plan's dtype (`FORMATS`), tied weights once,
  the modules a model keeps in fp32 at half precision (`_keep_in_fp32_modules`: T5's `wo` at fp16) in fp32.
- **Activations are estimates**, one formula each (`text_activations`, `step_activations`, `decode_activations`),
  each checked against the tensors alive during one forward pass traced on the meta device
  (`benchmarks/memory_table.py --trace`; the figures are in docs/memory.md). They assume a fused attention kernel
  (SDPA's flash or memory-efficient one, xformers): `--attention math` materialises batch x heads x tokens^2
  scores on top.
- **An allowance** (`CUDA_ALLOWANCE`) for what lies outside torch's tensors on a CUDA device.

The plan is data (`Plan`): its components (name, class, parameters, bytes, dtype, quantization, placement), the
placement's name, the predicted peak and whether it fits. What runs is a `Step` (placement, VAE mode, batch cap):
`apply` puts a pipeline in one with diffusers' calls (genkit.load, on CUDA), `next_step` is the one to retry a batch
with after running out of memory (the engine), `ran_out` the one line when that fails too. Quantizing is not done
here.

Three modules, one a seam: `genkit.memory.sizes` (weights counted and activations estimated on the meta device),
`genkit.memory.planner` (the placements, `plan`, `describe`) and `genkit.memory.runtime` (`Step`, `apply`,
`next_step`, `ran_out`). This package holds their public names: `genkit.memory.plan(...)`, `memory.Step()`.

LoRA training plans its memory too, in three more: `genkit.memory.training_sizes` (the model, its adapters and blocks
counted, a training step's activations estimated), `genkit.memory.training` (the training plan: `plan_training`, the
steps from gradient checkpointing to block swapping, `genkit train lora --dry-run`) and
`genkit.memory.training_runtime` (what genkit.train.lora calls to take those steps on CUDA).
"""

from genkit.memory.planner import CUDA_ALLOWANCE, PLACEMENTS, VAE_MODES, Plan, PlannedComponent, Prices, describe, plan
from genkit.memory.runtime import OutOfMemory, RanOut, Step, apply, next_step, ran_out, step_of
from genkit.memory.sizes import (DTYPES, FORMATS, QUANTIZATIONS, TOKEN_COPIES, UNET_ATTENTION_COPIES, UNITS, Component,
                                 Format, GiB, MetaModel, MiB, Weight, count, decode_activations, gib, meta_model,
                                 parse_bytes, step_activations, text_activations, weight_bytes)

__all__ = ["CUDA_ALLOWANCE", "DTYPES", "FORMATS", "GiB", "MiB", "PLACEMENTS", "QUANTIZATIONS", "TOKEN_COPIES",
           "UNET_ATTENTION_COPIES", "UNITS", "VAE_MODES", "Component", "Format", "MetaModel", "OutOfMemory", "Plan",
           "PlannedComponent", "Prices", "RanOut", "Step", "Weight", "apply", "count", "decode_activations",
           "describe", "gib", "meta_model", "next_step", "parse_bytes", "plan", "ran_out", "step_activations",
           "step_of", "text_activations", "weight_bytes"]
