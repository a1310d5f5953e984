"""The frozen parts of a pipeline during LoRA training, and the caches of what they produce.

Each distinct caption is embedded once (unless the text encoder is being trained), and each image variant (centre
crop, mirrored or not) is encoded once: into the VAE's latent distribution (mean, std) for latent families, into
pixels for genkit-mini. Caches fill in fixed chunks of ENCODE_CHUNK in sorted order, so every run encodes each
item with the same batch shapes (bitwise stable).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from genkit.errors import GenkitError
from genkit.train import shared
from genkit.train.recipe import LoraRecipe

ENCODE_CHUNK = 8  # images or captions per encoder call while filling the caches (fixed: results stay bitwise stable)


class Encoders:
    """The frozen parts of a pipeline, and the caches of what they produce."""

    def __init__(self, pipeline, recipe: LoraRecipe, resolution: int, device, text_encoder=None):
        self.pipe, self.family, self.recipe = pipeline.pipe, pipeline.family, recipe
        self.text_encoder = text_encoder if recipe.lora.text_encoder else pipeline.pipe.text_encoder
        self.resolution, self.device = resolution, device
        self.text_cache = shared.CaptionCache(self._encode_text, chunk=ENCODE_CHUNK)
        self.image_cache: dict[tuple, torch.Tensor] = {}

    # -- text -------------------------------------------------------------------------------
    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """What the denoiser reads of each caption, as the pipeline computes it when generating."""
        if self.recipe.lora.text_encoder:  # the adapted encoder runs with gradients (family.text_encoder_lora)
            return self.family.encode_captions_with(self.pipe, self.text_encoder, captions, self.device)
        return self.family.encode_captions(self.pipe, captions, self.device)

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.recipe.lora.text_encoder:  # being trained: encode with gradients, every step
            return self._encode_text(captions)
        return self.text_cache(captions)

    # -- images -----------------------------------------------------------------------------
    def _pixels(self, path: Path, mirrored: bool, crop_rng: random.Random | None) -> torch.Tensor:
        from genkit.data.decode import load_image, to_tensor

        try:
            image = load_image(path, self.resolution, random_crop=crop_rng is not None, rng=crop_rng)
        except OSError as exc:
            raise GenkitError(f"cannot read {path} ({exc}); it changed after the pre-flight check") from exc
        pixels = to_tensor(image)  # (3, resolution, resolution) in [-1, 1]
        return torch.flip(pixels, dims=[-1]) if mirrored else pixels

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latent families: the VAE's latent mean and std, (batch, 2, c, h, w); genkit-mini: the pixels themselves."""
        return self.family.encode_images(self.pipe, pixels.to(self.device))

    def fill_image_cache(self, variants: list[tuple[Path, bool]]) -> None:
        variants = sorted(set(variants))
        for i in range(0, len(variants), ENCODE_CHUNK):
            chunk = variants[i:i + ENCODE_CHUNK]
            encoded = self._encode_images(torch.stack([self._pixels(p, m, None) for p, m in chunk]))
            self.image_cache.update(zip(chunk, encoded))

    def clean(self, items, picked, generators: list[torch.Generator]) -> torch.Tensor:
        """The batch as the decoder denoises it: scaled latents drawn from the cached distribution, or pixels."""
        if self.recipe.data.cache_latents:
            encoded = torch.stack([self.image_cache[(items[i].path, m)] for i, _, m in picked])
        else:
            seed = self.recipe.train.seed
            pixels = [self._pixels(items[i].path, m, random.Random(f"{seed}:{e}:{i}") if self.recipe.data.random_crop
                                   else None) for i, e, m in picked]
            encoded = self._encode_images(torch.stack(pixels))
        return self.family.latents(self.pipe, encoded, generators)
