"""Z-Image (Tongyi-MAI): a 6B single-stream DiT over image patches and caption tokens together, read by Qwen3 (the
second-to-last hidden states of the chat-templated prompt, padding dropped), flow matching on Flux's 16-channel VAE.

Its transformer takes lists (each image and caption at its own length), is given 1 - sigma and predicts x0 - noise
(the pipeline negates it). Guidance is classifier-free with a negative prompt, at `pos + g * (pos - neg)`: on from
guidance > 0 (Turbo, distilled: 0). Its pipeline always passes sigmas, as a list: flow-heun and DPM-Solver take none,
and UniPC none as a list, so genkit passes the pipeline's own sigmas as an array (FlowMatchEuler makes the same
pixels). Attention goes through diffusers' dispatcher, with a boolean mask where a batch's captions differ in length;
LoRA files load through diffusers' ZImageLoraLoaderMixin (transformer only); diffusers has img2img and inpainting.
"""

import torch

from genkit.families.base import FlowFamily, Kohya, same_layer

DEFAULT_LATENT = 128  # latent pixels a side: ZImagePipeline makes `height or 1024` px, 128 on its VAE (factor 8)


class ZImage(FlowFamily):
    name = "z-image"
    title = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    max_sequence_length = 512  # the pipeline's max_sequence_length default (the chat template included)
    guidance_scale = 5.0  # ZImagePipeline's defaults; Turbo's (9 steps, guidance 0) are its preset's
    num_inference_steps = 50
    dispatcher = True
    attention_masked = True  # captions of different lengths in one call are masked
    # ComfyUI reads diffusers' names under diffusion_model. (its z_image_to_diffusers map fuses q, k, v itself); its
    # lora_unet_ names are the original's fused attention.qkv, which diffusers' converter does not read back
    kohya = Kohya("z_image", {"transformer": "lora_unet_"}, layer=same_layer, reader="ZImageLoraLoaderMixin",
                  layouts=("comfyui",))

    def samplers(self) -> tuple[str, ...]:
        return ("flow-euler", "flow-unipc")  # its pipelines pass sigmas, which flow-heun and DPM-Solver cannot take

    def patch(self, pipe) -> int:
        return 2  # the pipelines call the transformer with forward's default patch_size=2

    def default_size(self, pipe) -> int:
        """1024 on Z-Image's VAE, as its pipeline; counted in latent pixels (64x64 patches), as Flux's pipeline counts
        its own, so a VAE of another factor (a tiny test model's) keeps the real model's sequence length."""
        return DEFAULT_LATENT * int(pipe.vae_scale_factor)

    def call_args(self, batch, generators, on_step) -> dict:
        import numpy as np
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        args = super().call_args(batch, generators, on_step)
        args["sigmas"] = np.array(get_default_z_image_sigmas(batch[0].num_inference_steps))  # its own, for UniPC
        return args

    def prompt_limit(self, pipe):
        """The prompt's own share of the 512 tokens: the pipeline cuts its chat-templated text, which opens with the
        template's head (`<|im_start|>user\n`: 3 tokens on Qwen's tokenizer)."""
        tokenizer, limit = super().prompt_limit(pipe)
        if tokenizer is None or not limit:
            return tokenizer, limit
        head = _chat(tokenizer, "\0").partition("\0")[0]
        return tokenizer, limit - len(tokenizer(head, add_special_tokens=False).input_ids)

    def encode_captions(self, pipe, captions, device) -> dict:
        """Each caption's hidden states (their lengths differ), padded to the pipeline's cap with a mask."""
        hidden = pipe.encode_prompt(list(captions), device=device, do_classifier_free_guidance=False,
                                    max_sequence_length=self.max_sequence_length)[0]
        padded = torch.zeros(len(hidden), self.max_sequence_length, hidden[0].shape[-1], dtype=hidden[0].dtype,
                             device=hidden[0].device)
        mask = torch.zeros(len(hidden), self.max_sequence_length, dtype=torch.bool, device=hidden[0].device)
        for row, states in enumerate(hidden):
            padded[row, :len(states)], mask[row, :len(states)] = states, True
        return {"encoder_hidden_states": padded, "encoder_attention_mask": mask}

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        captions = [states[mask] for states, mask in zip(cond["encoder_hidden_states"], cond["encoder_attention_mask"])]
        out = denoiser(list(noisy.unsqueeze(2).unbind(0)), (1000 - t) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # as the pipeline: the transformer predicts x0 - noise

    # -- ControlNet: diffusers' ZImageControlNetModel (VideoX-Fun's Z-Image ControlNets), one at a time, every step
    controlnet_classes = ("ZImageControlNetModel",)
    controlnet_pipeline = "ZImageControlNetPipeline"
    controlnet_several = False  # ZImageControlNetPipeline holds one ControlNet
    controlnet_bounds = False  # ... which acts in every step (no control_guidance_start/_end)
    controlnet_fit = (("dim", "dim"), ("n_heads", "n_heads"), ("n_kv_heads", "n_kv_heads"),
                      ("all_patch_size", "all_patch_size"), ("all_f_patch_size", "all_f_patch_size"))

    def controlnet_misfit(self, pipe, controlnet) -> str | None:
        places, layers = list(controlnet.config.control_layers_places), pipe.transformer.config.n_layers
        if max(places) >= layers:
            return f"it steers layer {max(places)} and the transformer has {layers}"
        if controlnet.config.control_in_dim < pipe.transformer.config.in_channels:
            return (f"its control_in_dim is {controlnet.config.control_in_dim}, below the latents' "
                    f"{pipe.transformer.config.in_channels} channels")
        return super().controlnet_misfit(pipe, controlnet)

    def new_controlnet(self, pipe) -> torch.nn.Module:
        """A ZImageControlNetModel as the published Z-Image-Turbo ControlNet is laid out: a control block at every
        fifth transformer layer, the control image's latents in (its other parts are the transformer's own, shared
        when the pipeline is made: `ZImageControlNetModel.from_transformer`)."""
        from diffusers import ZImageControlNetModel

        config = pipe.transformer.config
        return ZImageControlNetModel(
            control_layers_places=list(range(0, config.n_layers, 5)), control_in_dim=config.in_channels,
            all_patch_size=tuple(config.all_patch_size), all_f_patch_size=tuple(config.all_f_patch_size),
            dim=config.dim, n_refiner_layers=config.n_refiner_layers, n_heads=config.n_heads,
            n_kv_heads=config.n_kv_heads, norm_eps=config.norm_eps, qk_norm=config.qk_norm)

    def load_controlnet_file(self, pipe, file, dtype) -> torch.nn.Module:
        """diffusers' `ZImageControlNetModel.from_single_file`: its config from a config.json beside the file, else
        the one diffusers names for the file's layout (from the Hugging Face cache: download it once with a network)."""
        from diffusers import ZImageControlNetModel

        beside = {"config": str(file.parent)} if (file.parent / "config.json").is_file() else {}
        return ZImageControlNetModel.from_single_file(str(file), torch_dtype=dtype, **beside)

    def lora_components(self, pipe) -> list[str]:
        return [self.denoiser_name]  # ZImageLoraLoaderMixin loads the transformer's adapters alone


def _chat(tokenizer, prompt: str) -> str:
    """`prompt` as ZImagePipeline gives it to Qwen3: in the tokenizer's chat template, thinking enabled."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


FAMILY = ZImage()
