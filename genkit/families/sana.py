"""SANA: a linear-attention DiT on a 32x deep-compression autoencoder (DC-AE), Gemma 2 text encoder, flow matching.

Its linear attention is its own processor: genkit never replaces it (SD-1.x processors would turn it
into softmax attention). The DC-AE encodes deterministically (no latent distribution).
"""

import inspect

import torch

from genkit.attention import Attention
from genkit.errors import term
from genkit.families.base import FlowFamily


class Sana(FlowFamily):
    name = "sana"
    title = "SANA"
    pipeline_classes = ("SanaPipeline",)
    max_sequence_length = 300  # the pipeline's max_sequence_length default
    guidance_scale = 4.5
    num_inference_steps = 20
    edit_tasks = ()  # diffusers has no image-to-image or inpainting pipeline for it

    checked_multiple = 32  # SanaPipeline checks 32 whatever its VAE
    dtypes = ("bf16", "fp16", "fp32")  # fp16: its fp16 variants; the bf16 ones overflow (NaN: said, nothing saved)

    def attention_unfit(self, backend) -> str | None:
        if backend is Attention.XFORMERS:  # its processors (linear self-attention, masked cross-attention) have no twin
            return (f"{self.title}'s attention processors are its own (linear self-attention), and none of them "
                    f"calls xformers (use {term('attention')} sdpa or math)")
        return super().attention_unfit(backend)

    def call_args(self, batch, generators, on_step) -> dict:
        args = super().call_args(batch, generators, on_step)
        args["use_resolution_binning"] = False  # the record's size is the size made, never a bin's
        args["clean_caption"] = False  # the prompt as written (cleaning needs bs4 + ftfy and rewrites it)
        return args

    def encode_captions(self, pipe, captions, device) -> dict:
        # the instruction the pipeline prepends when generating, so training sees the same embeddings
        instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        hidden, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                                device=device, clean_caption=False,
                                                complex_human_instruction=instruction)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def encode_images(self, pipe, pixels) -> torch.Tensor:
        latent = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent.float()
        return torch.stack([latent, torch.zeros_like(latent)], dim=1)  # (mean, std 0): deterministic

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        return denoiser(noisy, encoder_hidden_states=cond["encoder_hidden_states"],
                        encoder_attention_mask=cond["encoder_attention_mask"], timestep=t).sample


FAMILY = Sana()
