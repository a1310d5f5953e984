"""Which item each sample of a LoRA run is: a pure function of the seed and the sample's index in the whole run.

Epochs cover every entry of a stream once, in a seeded order (with seeded mirroring when flips are on); the user's
images and the prior images are two streams, and whether sample k is a prior image depends on k alone. An entry is
an image at one training size, in one aspect-ratio bucket (genkit.data.buckets); with one bucket (square images,
or buckets off) entries are the images themselves.

Every forward pass draws its concept rows from one bucket, so that they stack into one tensor. Each bucket is its
own stream (its entries in a seeded order per epoch of that bucket, running on across epochs), and the passes are
shared out among the buckets in proportion to their entries: pass g goes to the bucket furthest behind its share
(largest n_b * rows_after - N * rows_b, in whole numbers), ties to the first in a seeded order of the buckets. So
every bucket's entries are seen as often as every other's, and each epoch of a bucket covers it once. The prior
rows of a pass are fitted into its bucket. With one bucket the order is exactly the unbucketed one: batch size,
gradient accumulation and process count split the same samples, and a resumed run draws what an unbroken one
would have. With several buckets the pass is the unit: the same batch size and process count draw the same
samples, and resuming still does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property, lru_cache

import numpy as np

from genkit.data.buckets import BucketPlan, BucketSpec
from genkit.train.recipe import DataConfig, TrainConfig


@lru_cache(maxsize=64)
def epoch_plan(seed: int, epoch: int, n: int, stream: int = 0,
               bucket: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(order of the n entries, which of them are mirrored) for one epoch of one stream (0: the user's images,
    1: the prior images) or, with several buckets, of one bucket of the user's images."""
    key = [seed, epoch] + ([stream] if stream or bucket is not None else []) + ([bucket] if bucket is not None else [])
    rng = np.random.default_rng(key)
    return rng.permutation(n), rng.random(n) < 0.5


def sample_index(step: int, micro: int, cfg: TrainConfig, processes: int = 1, rank: int = 0) -> int:
    """Index, in the whole run, of the first sample of this forward pass."""
    return ((step * cfg.gradient_accumulation_steps + micro) * processes + rank) * cfg.batch_size


@dataclass(frozen=True)
class Streams:
    """The run's items: `n` entries of the user's images, then `priors` prior images, which fill `fraction` of the
    samples. `buckets`: the bucket of each entry (empty: all in one)."""

    n: int
    priors: int = 0
    fraction: Fraction = Fraction(0)
    buckets: tuple[int, ...] = ()

    def is_prior(self, k: int) -> bool:
        """Whether sample k is a prior image: priors before k are floor(k * fraction)."""
        return bool(self.priors) and math.floor((k + 1) * self.fraction) > math.floor(k * self.fraction)

    def concept_before(self, k: int) -> int:
        """Samples of the user's images before sample k."""
        return k - (math.floor(k * self.fraction) if self.priors else 0)

    def item(self, k: int, seed: int, flip: bool) -> tuple[int, int, bool]:
        """(item index, epoch, mirrored) of sample k of an unbucketed run."""
        if self.is_prior(k):
            epoch, position = divmod(math.floor(k * self.fraction), self.priors)
            order, flips = epoch_plan(seed, epoch, self.priors, 1)
            return self.n + int(order[position]), epoch, flip and bool(flips[order[position]])
        return self._entry(0, self.concept_before(k), seed, flip)

    # -- buckets ----------------------------------------------------------------------------
    @cached_property
    def members(self) -> list[list[int]]:
        """The entries of each bucket, in order."""
        if len(set(self.buckets)) <= 1:
            return [list(range(self.n))]
        members = [[] for _ in range(max(self.buckets) + 1)]
        for entry, bucket in enumerate(self.buckets):
            members[bucket].append(entry)
        return members

    def _entry(self, bucket: int, position: int, seed: int, flip: bool) -> tuple[int, int, bool]:
        """(entry index, epoch, mirrored) of the `position`-th sample of a bucket's stream."""
        members = self.members[bucket]
        epoch, position = divmod(position, len(members))
        order, flips = epoch_plan(seed, epoch, len(members), 0, bucket if len(self.members) > 1 else None)
        return members[int(order[position])], epoch, flip and bool(flips[order[position]])

    @cached_property
    def _schedules(self) -> dict:
        return {}  # (seed, batch) -> _Schedule: the passes planned so far

    def pass_bucket(self, first: int, batch: int, seed: int) -> tuple[int, int]:
        """(bucket, position in that bucket's stream of its first concept row) of the pass whose first sample is
        `first` (a multiple of `batch`)."""
        if len(self.members) == 1:
            return 0, self.concept_before(first)
        schedule = self._schedules.setdefault((seed, batch), _Schedule([len(m) for m in self.members]))
        while len(schedule.passes) <= first // batch:
            g = len(schedule.passes)
            schedule.add(self.concept_before((g + 1) * batch) - self.concept_before(g * batch), seed)
        return schedule.passes[first // batch]

    def pass_items(self, first: int, batch: int, seed: int, flip: bool) -> tuple[int, list[tuple[int, int, bool]]]:
        """(bucket, [(item index, epoch, mirrored)] of its samples) of the pass whose first sample is `first`."""
        bucket, position = self.pass_bucket(first, batch, seed)
        rows = []
        for k in range(first, first + batch):
            if self.is_prior(k):
                rows.append(self.item(k, seed, flip))
            else:
                rows.append(self._entry(bucket, position, seed, flip))
                position += 1
        return bucket, rows


class _Schedule:
    """Which bucket each pass draws from, planned pass by pass (each pass's choice depends on the ones before)."""

    def __init__(self, sizes: list[int]):
        self.sizes, self.total = sizes, sum(sizes)
        self.given = [0] * len(sizes)  # concept rows each bucket has given so far
        self.passes: list[tuple[int, int]] = []  # (bucket, its stream's position at the pass's first row)
        self.round, self.rank = -1, {}

    def add(self, rows: int, seed: int) -> None:
        """The next pass, of `rows` concept rows: to the bucket furthest behind its share once they are counted
        (whole numbers: n_b * rows_after - N * given_b), ties to the first in a seeded order of the buckets, drawn
        anew each time the rows given pass a multiple of N (so ties do not always favour the same bucket)."""
        after = sum(self.given) + rows
        rank = self._ranks(seed, after // self.total)
        best = max(range(len(self.sizes)), key=lambda b: (self.sizes[b] * after - self.total * self.given[b], -rank[b]))
        self.passes.append((best, self.given[best]))
        self.given[best] += rows

    def _ranks(self, seed: int, round_: int) -> dict[int, int]:
        if round_ != self.round:
            order = np.random.default_rng([seed, round_, 2]).permutation(len(self.sizes))
            self.round, self.rank = round_, {int(bucket): r for r, bucket in enumerate(order)}
        return self.rank


def batch_items(step: int, micro: int, cfg: TrainConfig, streams: Streams | int, flip: bool, processes: int = 1,
                rank: int = 0):
    """[(item index, epoch, mirrored)] of one forward pass: epochs cover every item of a stream once, in a seeded
    order; with several buckets, the concept rows all come from the pass's bucket (`pass_items`)."""
    return pass_items(step, micro, cfg, streams, flip, processes, rank)[1]


def pass_items(step: int, micro: int, cfg: TrainConfig, streams: Streams | int, flip: bool, processes: int = 1,
               rank: int = 0) -> tuple[int, list[tuple[int, int, bool]]]:
    """(bucket, [(item index, epoch, mirrored)]) of one forward pass."""
    streams = Streams(streams) if isinstance(streams, int) else streams
    start = sample_index(step, micro, cfg, processes, rank)
    return streams.pass_items(start, cfg.batch_size, cfg.seed, flip)


@dataclass
class RunData:
    """A run's samples as the trainer reads them: the items (the user's, then the prior images), the entries (each
    of the user's items at one training size, in one bucket), the streams over them, and the buckets."""

    items: list  # genkit.data.imagefolder.Item: the user's, then the prior images
    instances: int  # items[:instances] are the user's
    plan: BucketPlan  # the user's items' buckets and entries
    streams: Streams

    def item_of(self, index: int) -> int:
        """The item a stream index names: an entry's image, or a prior image."""
        entries = len(self.plan.entries)
        return self.plan.entries[index][0] if index < entries else self.instances + index - entries

    def rows(self, step: int, micro: int, cfg: TrainConfig, flip: bool, processes: int = 1, rank: int = 0):
        """(the pass's bucket, [(item index, epoch, mirrored)] of its rows)."""
        bucket, picked = pass_items(step, micro, cfg, self.streams, flip, processes, rank)
        return self.plan.buckets[bucket], [(self.item_of(i), e, m) for i, e, m in picked]

    def variants(self, flip: bool) -> list[tuple]:
        """Every (image path, mirrored, bucket) a run can draw: the user's images in their buckets, the prior images
        in every bucket (a pass's prior rows are fitted into its bucket)."""
        mirrored = (False, True) if flip else (False,)
        found = {(self.items[i].path, m, self.plan.buckets[b]) for i, b in self.plan.entries for m in mirrored}
        found |= {(item.path, m, bucket) for item in self.items[self.instances:] for m in mirrored
                  for bucket in self.plan.buckets}
        return sorted(found)

    @property
    def masks(self) -> dict:
        """image path -> its loss mask file, for the user's images that have one."""
        return {item.path: item.mask for item in self.items[:self.instances] if item.mask is not None}

    def describe(self) -> str:
        """The buckets and how many entries each holds: "32x32 12, 40x24 12, 24x40 12"."""
        counts = self.plan.counts()
        return ", ".join(f"{bucket} {counts[b]}" for b, bucket in enumerate(self.plan.buckets))


def plan_data(items: list, prior_items: list, data: DataConfig, multiple: int, fraction: Fraction) -> RunData:
    """The run's entries and streams: the user's `items` bucketed by `data` (its resolution already the model's),
    `prior_items` filling `fraction` of the samples."""
    spec = BucketSpec(data.sizes, multiple, data.buckets, data.bucket_step, data.bucket_max_ratio)
    plan = spec.plan([item.size or (1, 1) for item in items])
    buckets = tuple(b for _, b in plan.entries) if len(plan.buckets) > 1 else ()
    streams = Streams(len(plan.entries), len(prior_items), fraction, buckets)
    return RunData(list(items) + list(prior_items), len(items), plan, streams)
