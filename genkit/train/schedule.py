"""The learning-rate schedule both trainers use: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math


def learning_rate(step: int, *, peak: float, warmup: int, steps: int, decay: str = "cosine",
                  floor: float = 0.0) -> float:
    """The rate of optimizer step `step` (0-based): warm-up from 0 over `warmup` steps, then `peak` ("constant")
    or a cosine from `peak` down to `floor` at the last step ("cosine")."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
