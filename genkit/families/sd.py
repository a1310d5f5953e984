"""Stable Diffusion 1.x / 2.x: a UNet on 4-channel latents, one CLIP text encoder, true CFG.

Everything is the base family's; this module exists so each family has its one home.
"""

from genkit.families.base import Family


class StableDiffusion(Family):
    pass


FAMILY = StableDiffusion()
