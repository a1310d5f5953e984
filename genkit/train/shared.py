"""What both trainers (train/base.py, train/lora.py) share: the learning-rate schedule, the output folder and
resume checks, the loss log, and the cache of caption encodings.

Kept apart on purpose: how each trainer seeds a step's noise. The LoRA trainer draws it from
`step_generator(seed, sample)`, one generator per sample, so batch size, accumulation and process count never
change it; the base trainer draws one generator per step from `seed * 1_000_003 + step`, the stream genkit-mini's
shipped weights were trained with (changing it would make its recipe no longer reproduce them).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from genkit.errors import GenkitError, term
from genkit.outputs import save_text
from genkit.train import checkpoint


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


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator that depends on (seed, parts) only: noise is the same on any device."""
    state = np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def resume_point(out: Path, resume: bool, finished: Path) -> Path | None:
    """The checkpoint in `out` to resume from (None for a fresh run); refuses the ambiguous cases: --resume with
    nothing to resume, a fresh run over checkpoints, and a fresh run over a finished one (`finished` exists)."""
    if out.exists() and not out.is_dir():
        raise GenkitError(f"{out} is a file; pass a folder for the run and its checkpoints", param="out")
    ckpt = checkpoint.latest(out)
    if resume and ckpt is None:
        raise GenkitError(f"finds no complete checkpoint in {out} (start without it)", param="resume")
    if not resume and ckpt is not None:
        raise GenkitError(f"{out} already holds checkpoints (add {term('resume')} to continue, or choose another folder)",
                          param="out")
    if not resume and finished.exists():
        raise GenkitError(f"{out} already holds a finished run ({finished.name}); choose another folder", param="out")
    return ckpt


def check_same_run(meta: dict, model: str, dataset: str) -> None:
    """A checkpoint (its saved `meta`) continues only the run that made it: the same base model and data."""
    if meta["model"] != model:
        raise GenkitError(f"finds a checkpoint trained on {meta['model']}, not {model} (pass that {term('model')})",
                          param="resume")
    if meta["dataset"] != dataset:
        raise GenkitError(f"finds DATA_DIR changed since the checkpoint (fingerprint {meta['dataset']}, now "
                          f"{dataset}); restore it, or start a new run in another {term('out')}", param="resume")


class LossLog:
    """OUT/loss.jsonl: one line per optimizer step, {"step", "loss", "time"} (seconds since this call's loop
    started). Opened at the step a run starts (or resumes) from: lines past it, written after the checkpoint a
    resumed run starts from, are dropped first (the log rewritten through `genkit.outputs.atomic_write`), so the log
    holds each step once. Each step appends one line, so the log can be followed while the run goes; a line that a
    kill cut short is past the last checkpoint, and dropped like the others."""

    def __init__(self, path: Path, start: int, *, enabled: bool = True):
        self.path, self.enabled, self.started = path, enabled, time.time()
        if not enabled:
            return
        if path.is_file():
            save_text(path, "".join(line + "\n" for line in path.read_text().splitlines() if _step(line) <= start))
        self.file = path.open("a")

    def write(self, step: int, loss: float) -> None:
        if self.enabled:
            self.file.write(json.dumps({"step": step, "loss": round(loss, 6),
                                        "time": round(time.time() - self.started, 3)}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()

    def __enter__(self) -> "LossLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _step(line: str) -> float:
    """A loss-log line's step; infinite for a line a kill cut short (or an empty one)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class CaptionCache:
    """What a frozen text encoder makes of each distinct caption, computed once.

    `encode(captions)` returns tensors with the batch first; calling the cache with captions returns the same
    tensors, stacked, for those captions. Missing captions are encoded in sorted order, `chunk` at a time (the
    LoRA trainer fills the cache once before its loop, in fixed chunks: bitwise the same on every run), or all
    at once (None: the base trainer, which meets new captions every step)."""

    def __init__(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], chunk: int | None = 8):
        self.encode, self.chunk, self.cache = encode, chunk, {}

    @torch.no_grad()
    def fill(self, captions) -> None:
        missing = sorted(set(captions) - set(self.cache))
        size = self.chunk or max(1, len(missing))
        for i in range(0, len(missing), size):
            part = missing[i:i + size]
            encoded = self.encode(part)
            for j, caption in enumerate(part):
                self.cache[caption] = {key: value[j] for key, value in encoded.items()}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.fill(captions)
        return {key: torch.stack([self.cache[c][key] for c in captions]) for key in self.cache[captions[0]]}
