"""PixArt-Sigma: a DiT on 4-channel latents with T5 (300 tokens), epsilon prediction with a learned variance.

diffusers has no LoRA loader for PixArt (its transformer has no PeftAdapterMixin), so genkit writes
and loads its adapters with peft directly: keys `transformer.<layer>.lora_A.weight` in
`pytorch_lora_weights.safetensors`, the same layout diffusers writes for the other transformers.
"""

import torch

from genkit.families.base import DenoiserLoRA, TransformerFamily

BINNED_SIZES = (256, 512, 1024, 2048)  # sample_size x 8 that PixArt's aspect-ratio bins exist for


class PixArtSigma(DenoiserLoRA, TransformerFamily):
    name = "pixart-sigma"
    title = "PixArt-Sigma"
    pipeline_classes = ("PixArtSigmaPipeline",)
    checked_multiple = 8  # PixArtSigmaPipeline.check_inputs: "divisible by 8", whatever the VAE
    max_sequence_length = 300  # the pipeline's max_sequence_length default
    guidance_scale = 4.5
    num_inference_steps = 20
    edit_tasks = ()  # diffusers has no image-to-image or inpainting pipeline for it
    dtypes = ("fp16", "bf16", "fp32")
    gpu_dtypes = ("fp16",)  # PixArt-Sigma's weights and diffusers' docs: fp16

    def call_args(self, batch, generators, on_step) -> dict:
        args = super().call_args(batch, generators, None)
        del args["callback_on_step_end"]  # PixArt's pipeline has only the legacy per-step callback
        args["callback"], args["callback_steps"] = (lambda i, t, latents: on_step(None, i, t, {"latents": latents})), 1
        args["use_resolution_binning"] = False  # the record's size is the size made, never a bin's
        args["clean_caption"] = False  # the prompt as written (cleaning needs bs4 + ftfy and rewrites it)
        return args

    def encode_captions(self, pipe, captions, device) -> dict:
        hidden, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                                device=device, clean_caption=False)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        out = denoiser(noisy, encoder_hidden_states=cond["encoder_hidden_states"],
                       encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        if denoiser.config.out_channels // 2 == noisy.shape[1]:  # learned variance: the first half is epsilon
            out = out.chunk(2, dim=1)[0]
        return out

    def add_adapter(self, denoiser, config) -> None:
        """Its transformer has no diffusers peft mixin: peft injects the adapter directly."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, denoiser, adapter_name="default")
        denoiser.peft_config = {"default": config}

    def save_lora(self, pipe, folder, layers, metadata, weight_name) -> None:
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        tensors = {f"transformer.{k}": v.contiguous() for k, v in layers["transformer"].items()}
        header = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in
                                                                         metadata["transformer"].items()})}
        save_file(tensors, str(Path(folder) / weight_name), metadata=header)


FAMILY = PixArtSigma()
