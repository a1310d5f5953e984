"""Stable Diffusion 3 / 3.5: an MMDiT transformer on 16-channel latents, two CLIPs and a T5, flow matching, true CFG."""

import torch

from genkit.families.base import FlowFamily, original_key


class StableDiffusion3(FlowFamily):
    name = "sd3"
    title = "Stable Diffusion 3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    prompt_tokenizer = "tokenizer_3"  # T5: the sequence the transformer attends to
    max_sequence_length = 256  # the pipeline's max_sequence_length default
    guidance_scale = 7.0
    num_inference_steps = 28
    dtypes = ("bf16", "fp16", "fp32")  # fp16: SD3 Medium runs in it; SD3.5 overflows (NaN: said, nothing saved)

    def single_file_kind(self, keys) -> str | None:
        """Stability's MMDiT layout (joint_blocks.N...): with its VAE and text encoders (text_encoders.clip_l ...) an
        all-in-one checkpoint, else the transformer alone."""
        if not original_key(keys, "joint_blocks.0.x_block.attn.qkv.weight"):
            return None
        whole = any(key.startswith("text_encoders.") for key in keys) and any(key.startswith("first_stage_model.")
                                                                               for key in keys)
        return "checkpoint" if whole else "denoiser"

    def single_file_base(self, keys) -> str | None:
        return "sd35-medium"

    def encode_captions(self, pipe, captions, device) -> dict:
        hidden, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"]).sample


FAMILY = StableDiffusion3()
