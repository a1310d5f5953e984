"""Stable Diffusion 1.x / 2.x: a UNet on 4-channel latents, one CLIP text encoder, true CFG.

CLIP prompts past 75 tokens are read in 75-token chunks as A1111 does (genkit.families.clip_chunks),
the default; "truncate" keeps diffusers' cut at 77.
"""

from __future__ import annotations

import torch

from genkit.families import clip_chunks
from genkit.families.base import Kohya, UNetFamily, cut_prompt

UNET = "model.diffusion_model.input_blocks.0.0.weight"  # an LDM UNet's first convolution


class StableDiffusion(UNetFamily):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    checked_multiple = 8  # StableDiffusion(XL)Pipeline.check_inputs: "divisible by 8", whatever the VAE
    long_prompts = ("chunk", "truncate")
    text_encoder_lora = True
    kohya = Kohya("sd_v1", {"unet": "lora_unet_", "text_encoder": "lora_te_"}, v2_width=1024)
    dtypes = ("fp16", "bf16", "fp32")
    gpu_dtypes = ("fp16",)  # its weights are published in fp16 and run in it (A1111, ComfyUI, diffusers' docs)
    control_image_arg = "image"  # StableDiffusion(XL)ControlNetPipeline's word for the control images
    # IP-Adapter (genkit.ipadapter): h94/IP-Adapter's files, image_proj. (the image projection) and ip_adapter.N. (the
    # key and value projections of each cross-attention layer, N = 1, 3, 5, ...), read by diffusers' IPAdapterMixin
    ip_adapter_pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    ip_adapter_layout = ("image_proj.", "ip_adapter.")

    def load_ip_adapter(self, pipe, file) -> None:
        pipe.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name, image_encoder_folder=None,
                             local_files_only=True)

    def ip_adapter_shapes(self, pipe, image_embed_dim: int) -> dict[str, tuple[int, ...]]:
        """The base IP-Adapter's (4 image tokens): each cross-attention layer in the UNet's order, numbered as
        diffusers' loader reads them, its key and value projections from the text width to the layer's."""
        unet = pipe.unet
        width = unet.config.cross_attention_dim
        shapes = {"image_proj.proj.weight": (4 * width, image_embed_dim), "image_proj.proj.bias": (4 * width,),
                  "image_proj.norm.weight": (width,), "image_proj.norm.bias": (width,)}
        crossing = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
        for number, name in enumerate(crossing):
            inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for projection in ("to_k_ip", "to_v_ip"):
                shapes[f"ip_adapter.{2 * number + 1}.{projection}.weight"] = (inner, width)
        return shapes

    def single_file_kind(self, keys) -> str | None:
        """An LDM checkpoint (CompVis' layout: model.diffusion_model., first_stage_model., cond_stage_model.) with
        OpenAI's CLIP (1.x) or OpenCLIP (2.x) under cond_stage_model."""
        text = any(key.startswith("cond_stage_model.") for key in keys)
        return "checkpoint" if UNET in keys and text and "model.diffusion_model.label_emb.0.0.weight" not in keys else None

    def single_file_base(self, keys) -> str | None:
        return "sd15" if "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys else None

    # -- reading the prompt: CLIP's 75-token chunks --------------------------------------------
    def chunk_tokenizer(self, pipe):
        """The CLIP tokenizer that splits prompts into chunks (SDXL's two share one vocabulary)."""
        return getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)

    def chunks(self, pipe, text: str) -> int:
        return min(clip_chunks.count(self.chunk_tokenizer(pipe), text), clip_chunks.MAX_CHUNKS)

    def prompt_cut(self, pipe, prompt: str, mode: str) -> dict | None:
        if mode == "chunk":
            return clip_chunks.cut(self.chunk_tokenizer(pipe), prompt)
        return cut_prompt(*self.prompt_limit(pipe), prompt)

    def chunked_args(self, pipe, batch, chunks: int, args: dict) -> dict:
        args = {k: v for k, v in args.items() if k not in ("prompt", "negative_prompt")}
        return {**args, **self.chunk_embeds(pipe, batch, chunks)}

    def chunk_embeds(self, pipe, batch, chunks: int) -> dict:
        """The call's text as embeddings of `chunks` chunks each (replacing prompt / negative_prompt)."""

        def encode(texts):
            return clip_chunks.encode(pipe.text_encoder, pipe.tokenizer, texts, chunks)[0].to(pipe.text_encoder.dtype)

        return {"prompt_embeds": encode([job.prompt for job in batch]),
                "negative_prompt_embeds": encode([job.negative_prompt for job in batch])}

    # -- reading the prompt: A1111's weights (genkit.families.clip_weights) ---------------------
    prompt_weights = True

    def check_weights(self) -> None:
        from genkit.families import clip_weights

        clip_weights.require_compel()

    def weighted_chunks(self, pipe, text: str) -> int:
        from genkit.families import clip_weights

        return clip_weights.count(self.chunk_tokenizer(pipe), text)

    def weighted_args(self, pipe, batch, chunks: int, args: dict) -> dict:
        from genkit.families import clip_weights

        args = {k: v for k, v in args.items() if k not in ("prompt", "negative_prompt")}

        def encode(texts):
            return clip_weights.encode(pipe.text_encoder, pipe.tokenizer, texts, chunks)

        return {**args, "prompt_embeds": encode([job.prompt for job in batch]),
                "negative_prompt_embeds": encode([job.negative_prompt for job in batch])}

    # -- training ------------------------------------------------------------------------------
    def encode_captions(self, pipe, captions, device) -> dict[str, torch.Tensor]:
        hidden, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": hidden}

    def encode_captions_with(self, pipe, text_encoder, captions, device) -> dict[str, torch.Tensor]:
        tokens = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return {"encoder_hidden_states": text_encoder(tokens.input_ids.to(device))[0]}


FAMILY = StableDiffusion()
