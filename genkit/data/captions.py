"""Caption variants for training: caption dropout and tag shuffling, each a seeded choice per sample.

- Caption dropout (kohya's `caption_dropout_rate`, the base trainer's `data.caption_dropout`): with probability
  `dropout` a sample trains on the empty prompt, so the adapted model also learns the concept's images
  unconditioned, what classifier-free guidance steers from.
- Tag shuffling (kohya's `shuffle_caption` and `keep_tokens`): a caption written as comma-separated tags
  ("sks dog, sitting, on grass, photo") has its tags after the first `keep_tokens` shuffled for every sample, so
  no tag is learned for its place; the leading ones (the trigger words, by convention) stay first. A caption
  without commas is one tag and never changes.

Every choice comes from a generator seeded by (seed, sample index) alone, so a sample gets the same caption
whatever the batch size, process count or resume point. With neither on, `caption_variant` returns the caption
as it is and draws nothing.
"""

from __future__ import annotations

import numpy as np

CAPTION_STREAM = 3  # the third number of a sample's seed, after (seed, sample): apart from genkit's other streams


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, stripped, empty ones left out."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep: int, rng: np.random.Generator) -> str:
    """The caption's tags after the first `keep` in the order of a permutation drawn from `rng`."""
    tags = split_tags(caption)
    rest = tags[keep:]
    return ", ".join(tags[:keep] + [rest[i] for i in rng.permutation(len(rest))])


def caption_variant(caption: str, sample: int, seed: int, *, dropout: float = 0.0, shuffle: bool = False,
                    keep_tokens: int = 0) -> str:
    """What sample `sample` of a run trains on for `caption`: "" with probability `dropout`, else the caption with
    its tags shuffled after the first `keep_tokens` when `shuffle`."""
    if not dropout and not shuffle:
        return caption
    rng = np.random.default_rng([seed, sample, CAPTION_STREAM])
    if rng.random() < dropout:  # drawn even at dropout 0, so turning dropout on keeps every sample's shuffle
        return ""
    return shuffle_tags(caption, keep_tokens, rng) if shuffle else caption
