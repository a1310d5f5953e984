"""Flux.1: a double/single-stream transformer on packed 2x2 latent patches, CLIP (pooled) + T5, flow matching.

Its `guidance_scale` is a distilled input (dev: 3.5; schnell ignores it), not classifier-free
guidance, so Flux takes no negative prompt here. Attention goes through diffusers' dispatcher.
"""

import re

import torch

from genkit.families.base import FlowFamily, Kohya, KohyaLayer, original_key

FLUX1_WIDTH = 3072  # diffusers' convert_flux_transformer_checkpoint_to_diffusers: inner_dim = 3072
RENAMES = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_mlp.0": "ff.net.0.proj",
          "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
          "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
          "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
          "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
          "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out", "norm.query_norm.scale": "attn.norm_q.weight",
          "norm.key_norm.scale": "attn.norm_k.weight"}


def flux_to_diffusers(state: dict) -> dict:
    """A Flux transformer's weights from Black Forest Labs' names to diffusers', at any width: what diffusers'
    convert_flux_transformer_checkpoint_to_diffusers does at Flux.1's 3072 (qkv split in three; a single block's linear1
    into q, k, v and the MLP's input; the final modulation's shift and scale swapped)."""
    state, out = dict(state), {}
    width = state["img_in.weight"].shape[0]

    def rename(old: str, new: str) -> None:
        ends = ("",) if old.endswith(".scale") else (".weight", ".bias")
        for end in ends:
            if old + end in state:
                out[new.removesuffix(".weight") + end if end else new] = state.pop(old + end)

    def split(old: str, news: list[str]) -> None:
        for end in (".weight", ".bias"):
            tensor = state.pop(old + end)
            sizes = [width] * (len(news) - 1) + [tensor.shape[0] - width * (len(news) - 1)]
            out.update({new + end: part for new, part in zip(news, tensor.split(sizes))})

    for old, new in RENAMES.items():
        rename(old, new)
    for block in sorted({key.split(".")[1] for key in state if key.startswith("double_blocks.")}):
        old, new = f"double_blocks.{block}.", f"transformer_blocks.{block}."
        for a, b in DOUBLE.items():
            rename(old + a, new + b)
        split(old + "img_attn.qkv", [f"{new}attn.to_{x}" for x in "qkv"])
        split(old + "txt_attn.qkv", [f"{new}attn.add_{x}_proj" for x in "qkv"])
    for block in sorted({key.split(".")[1] for key in state if key.startswith("single_blocks.")}):
        old, new = f"single_blocks.{block}.", f"single_transformer_blocks.{block}."
        for a, b in SINGLE.items():
            rename(old + a, new + b)
        split(old + "linear1", [f"{new}attn.to_q", f"{new}attn.to_k", f"{new}attn.to_v", f"{new}proj_mlp"])
    for end in (".weight", ".bias"):  # the original's (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)
        shift, scale = state.pop("final_layer.adaLN_modulation.1" + end).chunk(2)
        out["norm_out.linear" + end] = torch.cat([scale, shift])
    if state:
        from genkit.errors import GenkitError

        raise GenkitError(f"tensors a Flux transformer does not have: {', '.join(sorted(state)[:3])}", param="model")
    return out


def double_block_layer(match, layer: str, names: dict) -> KohyaLayer | None:
    """A double block's layer (`match` of `transformer_blocks.N.rest`) under its original name: q, k and v (and the
    text stream's) fused into one qkv layer, the others by `names` (diffusers' name -> the original's)."""
    old, new, rest = f"double_blocks.{match[1]}.", f"transformer_blocks.{match[1]}.", match[2]
    if rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
        return KohyaLayer(old + "img_attn.qkv", tuple(f"{new}attn.to_{x}" for x in "qkv"), (1, 1, 1))
    if rest in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
        return KohyaLayer(old + "txt_attn.qkv", tuple(f"{new}attn.add_{x}_proj" for x in "qkv"), (1, 1, 1))
    return KohyaLayer(old + names[rest], (layer,)) if rest in names else None


def kohya_layer(layer: str) -> KohyaLayer | None:
    """A diffusers Flux transformer layer as Black Forest Labs' model names it, which kohya's sd-scripts
    (`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI (`diffusion_model.double_blocks.0.img_attn.qkv`) write:
    the inverse of `flux_to_diffusers`, so q, k and v (with a single block's MLP input, 4x as wide) are one layer."""
    if match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", layer):
        return double_block_layer(match, layer, {b: a for a, b in DOUBLE.items() if not a.endswith(".scale")})
    if match := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", layer):
        old, new, rest = f"single_blocks.{match[1]}.", f"single_transformer_blocks.{match[1]}.", match[2]
        if rest in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
            parts = tuple(f"{new}attn.to_{x}" for x in "qkv") + (f"{new}proj_mlp",)
            return KohyaLayer(old + "linear1", parts, (1, 1, 1, 4))  # Flux's mlp_ratio: 4
        names = {b: a for a, b in SINGLE.items() if not a.endswith(".scale")}
        return KohyaLayer(old + names[rest], (layer,)) if rest in names else None
    if layer == "norm_out.linear":
        return KohyaLayer("final_layer.adaLN_modulation.1", (layer,), swap=True)
    names = {b: a for a, b in RENAMES.items()}
    return KohyaLayer(names[layer], (layer,)) if layer in names else None


class Flux(FlowFamily):
    name = "flux"
    title = "Flux.1"
    pipeline_classes = ("FluxPipeline",)
    prompt_tokenizer = "tokenizer_2"  # T5: the sequence the transformer attends to
    max_sequence_length = 512  # the pipeline's max_sequence_length default
    negative_prompt = False
    dispatcher = True
    guidance_scale = 3.5
    num_inference_steps = 28
    kohya = Kohya("flux1", {"transformer": "lora_unet_"}, layer=kohya_layer, reader="FluxLoraLoaderMixin",
                  layouts=("kohya", "comfyui"))

    def single_file_kind(self, keys) -> str | None:
        """Black Forest Labs' layout (double_blocks.N.img_attn.qkv ...), bare or under model.diffusion_model. (with or
        without a VAE and text encoders beside it: only the transformer is read, the rest comes from the base)."""
        flux = original_key(keys, "double_blocks.0.img_attn.qkv.weight")
        return "denoiser" if flux and not original_key(keys, "distilled_guidance_layer.in_proj.bias") else None

    def single_file_base(self, keys) -> str | None:
        return "flux-dev" if original_key(keys, "guidance_in.in_layer.weight") else "flux-schnell"

    def single_file_state(self, file):
        """Flux.1's transformers are 3072 wide, which diffusers' converter assumes (it splits a single block's linear1
        at 3072); another width is converted here by the same names (`flux_to_diffusers`)."""
        from safetensors.torch import load_file

        if file.suffix not in (".safetensors", ".sft"):
            return None
        state = {key.removeprefix("model.diffusion_model."): value for key, value in load_file(str(file)).items()
                 if not key.startswith(("vae.", "text_encoders.", "first_stage_model.", "cond_stage_model."))}
        return None if state["img_in.weight"].shape[0] == FLUX1_WIDTH else flux_to_diffusers(state)

    def samplers(self) -> tuple[str, ...]:
        return ("flow-euler", "flow-dpm++", "flow-unipc")  # FluxPipeline passes sigmas, which flow-heun cannot take

    def latent_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2  # latents are packed in 2x2 patches

    def default_size(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def decode(self, pipe, latents, width, height) -> torch.Tensor:
        """Its latents come packed in 2x2 patches, (batch, tokens, 4 * channels): unpacked first."""
        return super().decode(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor), width, height)

    def hires_latents(self, pipe, output, width, height, new_width, new_height) -> torch.Tensor:
        """Its pipeline returns packed latents (batch, tokens, 64): unpacked, then upscaled as the others'."""
        latents = pipe._unpack_latents(output, height, width, pipe.vae_scale_factor)
        return super().hires_latents(pipe, latents, width, height, new_width, new_height)

    # -- ControlNet: diffusers' FluxControlNetModel (InstantX's and XLabs' layouts) in FluxControlNetPipeline ---------
    controlnet_classes = ("FluxControlNetModel",)
    controlnet_pipeline = "FluxControlNetPipeline"
    controlnet_fit = tuple((key, key) for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim",
                                                  "num_attention_heads", "attention_head_dim", "axes_dims_rope"))

    def new_controlnet(self, pipe) -> torch.nn.Module:
        """diffusers' `FluxControlNetModel.from_transformer` with its default depth (4 double and 10 single blocks)
        or the transformer's, where it has fewer."""
        from diffusers import FluxControlNetModel

        config = pipe.transformer.config
        return FluxControlNetModel.from_transformer(
            pipe.transformer, num_layers=min(4, config.num_layers), num_single_layers=min(10, config.num_single_layers),
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)

    def control_args(self, pipe, batch, generators, units, images) -> dict:
        """Also the starting noise, drawn as FluxPipeline draws it: its ControlNet pipeline samples the control image's
        latents with the images' generators before their noise, so without this an image's noise would depend on
        whether a ControlNet runs (and weight 0 would not be the plain image)."""
        args = super().control_args(pipe, batch, generators, units, images)
        first, encoder = batch[0], getattr(pipe, "text_encoder", None)
        dtype = encoder.dtype if encoder is not None else pipe.transformer.dtype  # the prompt embeddings' dtype
        args["latents"] = pipe.prepare_latents(len(batch), pipe.transformer.config.in_channels // 4, first.height,
                                               first.width, dtype, pipe._execution_device, generators)[0]
        return args

    # -- IP-Adapter (genkit.ipadapter): XLabs' layout, ip_adapter_proj_model. (the image projection) and
    # double_blocks.N.processor. (the key and value projections of each double block), read by FluxIPAdapterMixin
    ip_adapter_pipelines = ("FluxPipeline",)
    ip_adapter_layout = ("ip_adapter_proj_model.", "double_blocks.")

    def load_ip_adapter(self, pipe, file) -> None:
        pipe.load_ip_adapter(str(file.parent), weight_name=file.name, image_encoder_pretrained_model_name_or_path=None,
                             local_files_only=True)

    def ip_adapter_shapes(self, pipe, image_embed_dim: int) -> dict[str, tuple[int, ...]]:
        """XLabs' (4 image tokens): the projection to T5's width, each double block's key and value from it."""
        config = pipe.transformer.config
        width, inner = config.joint_attention_dim, pipe.transformer.inner_dim
        shapes = {"ip_adapter_proj_model.proj.weight": (4 * width, image_embed_dim),
                  "ip_adapter_proj_model.proj.bias": (4 * width,), "ip_adapter_proj_model.norm.weight": (width,),
                  "ip_adapter_proj_model.norm.bias": (width,)}
        for block in range(config.num_layers):
            for projection in ("k", "v"):
                name = f"double_blocks.{block}.processor.ip_adapter_double_stream_{projection}_proj"
                shapes.update({f"{name}.weight": (inner, width), f"{name}.bias": (inner,)})
        return shapes

    def encode_captions(self, pipe, captions, device) -> dict:
        hidden, pooled, _ = pipe.encode_prompt(captions, None, device=device, num_images_per_prompt=1)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        batch, channels, height, width = noisy.shape  # latents, (batch, 16, h, w)
        packed = pipe._pack_latents(noisy, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        hidden = cond["encoder_hidden_states"]
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:  # distilled guidance: train at the default scale, as diffusers' script does
            guidance = torch.full((batch,), self.guidance_scale, device=noisy.device, dtype=noisy.dtype)
        out = denoiser(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_projections"], encoder_hidden_states=hidden, txt_ids=text_ids,
                       img_ids=image_ids).sample
        scale = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, height * scale, width * scale, scale)


FAMILY = Flux()
