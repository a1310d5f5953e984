"""Which item each sample of a LoRA run is: a pure function of the seed and the sample's index in the whole run.

Epochs cover every item of a stream once, in a seeded order (with seeded mirroring when flips are on); the user's
images and the prior images are two streams, and whether sample k is a prior image depends on k alone. So batch
size, gradient accumulation and process count split the same samples, and a resumed run draws what an unbroken
one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from genkit.train.recipe import TrainConfig


@lru_cache(maxsize=8)
def epoch_plan(seed: int, epoch: int, n: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(order of the n items, which of them are mirrored) for one epoch of one stream (0: the user's images,
    1: the prior images)."""
    rng = np.random.default_rng([seed, epoch] + ([stream] if stream else []))
    return rng.permutation(n), rng.random(n) < 0.5


def sample_index(step: int, micro: int, cfg: TrainConfig, processes: int = 1, rank: int = 0) -> int:
    """Index, in the whole run, of the first sample of this forward pass."""
    return ((step * cfg.gradient_accumulation_steps + micro) * processes + rank) * cfg.batch_size


@dataclass(frozen=True)
class Streams:
    """The run's items: `n` of the user's images, then `priors` prior images, which fill `fraction` of the samples."""

    n: int
    priors: int = 0
    fraction: Fraction = Fraction(0)

    def item(self, k: int, seed: int, flip: bool) -> tuple[int, int, bool]:
        """(item index, epoch, mirrored) of sample k of the run. Whether sample k is a prior image depends on k
        alone (priors before k: floor(k * fraction)), so batch sizes and process counts split the same samples."""
        before = math.floor(k * self.fraction) if self.priors else 0
        if self.priors and math.floor((k + 1) * self.fraction) > before:
            stream, position, n, offset = 1, before, self.priors, self.n
        else:
            stream, position, n, offset = 0, k - before, self.n, 0
        epoch, position = divmod(position, n)
        order, flips = epoch_plan(seed, epoch, n, stream)
        return offset + int(order[position]), epoch, flip and bool(flips[order[position]])


def batch_items(step: int, micro: int, cfg: TrainConfig, streams: Streams | int, flip: bool, processes: int = 1,
                rank: int = 0):
    """[(item index, epoch, mirrored)] of one forward pass: epochs cover every item of a stream once, in a seeded
    order."""
    streams = Streams(streams) if isinstance(streams, int) else streams
    start = sample_index(step, micro, cfg, processes, rank)
    return [streams.item(k, cfg.seed, flip) for k in range(start, start + cfg.batch_size)]
