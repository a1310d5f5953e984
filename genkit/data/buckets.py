"""Aspect-ratio buckets: training images keep their shape instead of being cropped to one square.

Each training size `resolution` gets a list of buckets, sizes of about resolution^2 pixels in every shape
from tall to wide, as kohya's sd-scripts (`make_bucket_resolutions`) and the SDXL bucket list make them:

1. the square, resolution x resolution (always there, so a square image trains exactly as without buckets);
2. for every width w on a grid of `step` pixels, the tallest height on the same grid with w x h <= resolution^2,
   kept while neither side is more than `max_ratio` times the other, and its transpose. At 1024 with step 64
   these are SDXL's buckets (1152x896, 1216x832, 1344x768, ... and their transposes; 1536x640 needs a
   `max_ratio` of 2.4).

Each image goes to the bucket whose aspect ratio is nearest its own (in log ratio, so a tall and a wide image
of the same elongation are treated alike; ties go to the larger bucket), then is resized to cover the bucket
and centre-cropped, so it loses at most the sliver between its shape and the bucket's. `step` 0 picks the grid
itself: 64 px as kohya and SimpleTuner use from 512 up, resolution / 8 below that, and never finer than the
model's side multiple (which every bucket side keeps). With buckets off every image takes the square bucket
(a centre crop, as before). Several training sizes (`resolutions`) give each image one entry per size.

Which bucket each batch draws from is the trainer's (genkit.train.sampling); this module only plans.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from genkit.errors import GenkitError

DEFAULT_STEP = 64  # px between bucket sides from 512 up (kohya's bucket_reso_steps, SimpleTuner's alignment)
FINE_STEP_FRACTION = 8  # below 512 px: resolution / 8 (genkit-mini at 32 px: 4 px, its own multiple)


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def ratio(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def auto_step(resolution: int, multiple: int) -> int:
    """The grid of bucket sides when `data.bucket_step` is 0: 64 px, finer for small sizes, a multiple of `multiple`."""
    step = min(DEFAULT_STEP, resolution // FINE_STEP_FRACTION) // multiple * multiple
    return max(multiple, step)


def bucket_sizes(resolution: int, multiple: int = 1, *, step: int = 0, max_ratio: float = 2.0) -> list[Bucket]:
    """Every bucket of about resolution^2 pixels, sides on a grid of `step` px (0: `auto_step`), sorted by width."""
    step = step or auto_step(resolution, multiple)
    if step % multiple:
        raise GenkitError(f"data.bucket_step must be a multiple of the model's side multiple {multiple}, got {step} "
                          f"(try {max(multiple, step // multiple * multiple)})")
    area = resolution * resolution
    found = {Bucket(resolution, resolution)}
    widest = int(resolution * math.sqrt(max_ratio))  # w / h <= max_ratio with w h <= area
    for width in range(step, widest + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            found |= {Bucket(width, height), Bucket(height, width)}
    return sorted(found)


def nearest(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest width / height (log ratio; ties: the larger, then the wider)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.ratio) - ratio), -b.width * b.height, -b.width))


def cropped_share(width: int, height: int, bucket: Bucket) -> float:
    """The share of an image's pixels that covering `bucket` and centre-cropping it cuts away."""
    scale = max(bucket.width / width, bucket.height / height)
    return 1 - bucket.width * bucket.height / (width * scale * height * scale)


@dataclass(frozen=True)
class BucketSpec:
    """How a run buckets its images: its training sizes, the model's side multiple and the data.bucket* keys."""

    resolutions: tuple[int, ...]  # training sizes in pixels, each a multiple of `multiple`
    multiple: int = 1  # the model's side multiple (genkit.families.base.Family.multiple)
    enabled: bool = True  # data.buckets; off: the square bucket for every image (a centre crop)
    step: int = 0  # data.bucket_step; 0: auto_step
    max_ratio: float = 2.0  # data.bucket_max_ratio: the longer side at most this times the shorter

    def buckets(self, resolution: int) -> list[Bucket]:
        if not self.enabled:
            return [Bucket(resolution, resolution)]
        return bucket_sizes(resolution, self.multiple, step=self.step, max_ratio=self.max_ratio)

    def plan(self, sizes: list[tuple[int, int]]) -> BucketPlan:
        """Where each image (its width and height, upright) trains: one entry per image and training size."""
        buckets, entries = [], []
        for resolution in self.resolutions:
            choices = self.buckets(resolution)
            for index, (width, height) in enumerate(sizes):
                bucket = nearest(width, height, choices)
                if bucket not in buckets:
                    buckets.append(bucket)
                entries.append((index, buckets.index(bucket)))
        order = sorted(range(len(buckets)), key=lambda b: (buckets[b].width * buckets[b].height, buckets[b].width))
        rank = {old: new for new, old in enumerate(order)}
        return BucketPlan([buckets[b] for b in order], sorted((i, rank[b]) for i, b in entries), self)


@dataclass
class BucketPlan:
    """The buckets a run uses (sorted by area, then width) and its entries: (image index, bucket index), what one
    epoch covers: every image once per training size, in image order then size order."""

    buckets: list[Bucket]
    entries: list[tuple[int, int]]
    spec: BucketSpec = field(repr=False)

    def counts(self) -> Counter:
        """Entries per bucket index."""
        return Counter(b for _, b in self.entries)

    def bucket_of(self, entry: int) -> Bucket:
        return self.buckets[self.entries[entry][1]]
