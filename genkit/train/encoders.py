"""The frozen parts of a pipeline during LoRA training, and the caches of what they produce.

Each distinct caption is embedded once (unless the text encoder is being trained, or tags are shuffled: then each
pass's captions are encoded as the pass comes, in one call, the same call on every run), and each image variant
(an image in one bucket, centre-cropped, mirrored or not) is encoded once: into the VAE's latent distribution
(mean, std) for latent families, into pixels for genkit-mini. An image's loss mask (genkit.data.imagefolder) is
cropped and mirrored with it and averaged down to the latent grid (area interpolation), cached beside it. Caches
fill in fixed chunks of ENCODE_CHUNK in sorted order, bucket by bucket, so every run encodes each item with the
same batch shapes (bitwise stable).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genkit.data.buckets import Bucket
from genkit.errors import GenkitError
from genkit.train import shared
from genkit.train.recipe import LoraRecipe

ENCODE_CHUNK = 8  # images or captions per encoder call while filling the caches (fixed: results stay bitwise stable)


class Encoders:
    """The frozen parts of a pipeline, and the caches of what they produce. `masks`: image path -> its mask file."""

    def __init__(self, pipeline, recipe: LoraRecipe, resolution: int, device, text_encoder=None,
                 masks: dict[Path, Path] | None = None):
        self.pipe, self.family, self.recipe = pipeline.pipe, pipeline.family, recipe
        self.text_encoder = text_encoder if recipe.lora.text_encoder else pipeline.pipe.text_encoder
        self.resolution, self.device = resolution, device
        self.masks = masks or {}
        self.text_cache = shared.CaptionCache(self._encode_text, chunk=ENCODE_CHUNK)
        self.image_cache: dict[tuple, torch.Tensor] = {}
        self.mask_cache: dict[tuple, torch.Tensor] = {}  # (path, mirrored, bucket) -> (1, h, w) on the latent grid

    # -- text -------------------------------------------------------------------------------
    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """What the denoiser reads of each caption, as the pipeline computes it when generating."""
        if self.recipe.lora.text_encoder:  # the adapted encoder runs with gradients (family.text_encoder_lora)
            return self.family.encode_captions_with(self.pipe, self.text_encoder, captions, self.device)
        return self.family.encode_captions(self.pipe, captions, self.device)

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.recipe.lora.text_encoder:  # being trained: encode with gradients, every step
            return self._encode_text(captions)
        if self.recipe.data.caption_every_step:  # shuffled tags: this pass's distinct captions, in one call
            distinct = sorted(set(captions))
            with torch.no_grad():
                encoded = self._encode_text(distinct)
            rows = torch.tensor([distinct.index(c) for c in captions])
            return {key: value[rows.to(value.device)] for key, value in encoded.items()}
        return self.text_cache(captions)

    # -- images -----------------------------------------------------------------------------
    def _pixels(self, path: Path, mirrored: bool, bucket: Bucket,
                crop_rng: random.Random | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the image, (3, height, width) in [-1, 1]; its mask, (1, height, width) in [0, 1], or None)."""
        from genkit.data.decode import load_training_pair, to_tensor

        mask = self.masks.get(path) if self.recipe.data.masks else None
        try:
            image, weights = load_training_pair(path, (bucket.width, bucket.height), mask=mask,
                                                random_crop=crop_rng is not None, rng=crop_rng)
        except OSError as exc:
            raise GenkitError(f"cannot read {path} ({exc}); it changed after the pre-flight check") from exc
        pixels = to_tensor(image)
        if weights is not None:
            weights = torch.from_numpy(np.asarray(weights, dtype=np.float32) / 255)[None]
        if mirrored:
            pixels = torch.flip(pixels, dims=[-1])
            weights = torch.flip(weights, dims=[-1]) if weights is not None else None
        return pixels, weights

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latent families: the VAE's latent mean and std, (batch, 2, c, h, w); genkit-mini: the pixels themselves."""
        return self.family.encode_images(self.pipe, pixels.to(self.device))

    def fill_image_cache(self, variants: list[tuple[Path, bool, Bucket]]) -> None:
        """Encode each (image, mirrored, bucket) once, bucket by bucket, ENCODE_CHUNK at a time in sorted order."""
        variants = set(variants)
        for bucket in sorted({b for _, _, b in variants}):
            inside = sorted((p, m) for p, m, b in variants if b == bucket)
            for i in range(0, len(inside), ENCODE_CHUNK):
                chunk = inside[i:i + ENCODE_CHUNK]
                loaded = [self._pixels(p, m, bucket, None) for p, m in chunk]
                encoded = self._encode_images(torch.stack([pixels for pixels, _ in loaded]))
                self.image_cache.update(((p, m, bucket), e) for (p, m), e in zip(chunk, encoded))
                for (p, m), (_, weights) in zip(chunk, loaded):
                    if weights is not None:
                        self.mask_cache[(p, m, bucket)] = _on_grid(weights, encoded.shape[-2:])

    def clean(self, items, picked, bucket: Bucket,
              generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch as the decoder denoises it (scaled latents drawn from the cached distribution, or pixels), and
        the loss weights of its rows on the latent grid, (batch, 1, h, w) (None when no row has a mask).
        `picked`: (item index, epoch, mirrored) of each row."""
        if self.recipe.data.cache_latents:
            keys = [(items[i].path, m, bucket) for i, _, m in picked]
            encoded = torch.stack([self.image_cache[key] for key in keys])
            weights = [self.mask_cache.get(key) for key in keys]
        else:
            seed = self.recipe.train.seed
            loaded = [self._pixels(items[i].path, m, bucket, random.Random(f"{seed}:{e}:{i}")
                                   if self.recipe.data.random_crop else None) for i, e, m in picked]
            encoded = self._encode_images(torch.stack([pixels for pixels, _ in loaded]))
            weights = [_on_grid(w, encoded.shape[-2:]) if w is not None else None for _, w in loaded]
        latents = self.family.latents(self.pipe, encoded, generators)
        if all(w is None for w in weights):
            return latents, None
        grid = latents.shape[-2:]
        return latents, torch.stack([w if w is not None else torch.ones(1, *grid) for w in weights]).to(latents.device)


def _on_grid(weights: torch.Tensor, size) -> torch.Tensor:
    """A (1, height, width) pixel mask averaged down to the latent grid `size` (each latent pixel: its patch's mean)."""
    if tuple(weights.shape[-2:]) == tuple(size):
        return weights
    return F.interpolate(weights[None], size=tuple(size), mode="area")[0]
