"""One attention setting applied to any pipeline: auto, xformers, sdpa, sliced or math.

- `sdpa`: PyTorch's `scaled_dot_product_attention` (flash / memory-efficient kernels on GPUs).
- `xformers`: xformers' memory-efficient attention; needs CUDA and an xformers build that
  matches the installed torch.
- `sliced`: attention computed a slice of heads at a time; lowest peak memory, slower (UNet families).
- `math`: the plain softmax(QK^T)V reference.
- `auto`: xformers when on CUDA and importable, else sdpa.

How a backend reaches a model is its family's business (`Family.apply_attention`): UNets take
diffusers' attention processors; transformers keep their own processors (joint, rotary, linear)
and `math` chooses SDPA's math kernel around each call.
"""

from __future__ import annotations

import importlib.util
from enum import Enum

from genkit.errors import GenkitError, term


class Attention(str, Enum):
    AUTO = "auto"
    XFORMERS = "xformers"
    SDPA = "sdpa"
    SLICED = "sliced"
    MATH = "math"


NAMES = tuple(a.value for a in Attention)


def parse(name: str | Attention) -> Attention:
    try:
        return Attention(str(name.value if isinstance(name, Attention) else name).lower())
    except ValueError:
        raise GenkitError(f"{name!r} is not an attention backend genkit knows (valid: {', '.join(NAMES)})",
                          param="attention") from None


def xformers_problem(device: str) -> str | None:
    """Why xformers cannot run here, or None when it can."""
    if not str(device).startswith("cuda"):
        return f"xformers needs a CUDA device, and this run is on {device}"
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'genkit[xformers]')"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # a build for another torch/CUDA fails here
        return f"xformers is installed but does not load: {exc}"
    return None


def resolve(name: str | Attention, device: str) -> Attention:
    """The concrete backend for `name` on `device`; raises when xformers is asked for but cannot run."""
    choice = parse(name)
    if choice is Attention.AUTO:
        return Attention.XFORMERS if xformers_problem(device) is None else Attention.SDPA
    if choice is Attention.XFORMERS:
        problem = xformers_problem(device)
        if problem:
            raise GenkitError(f"xformers: {problem} (use {term('attention')} sdpa)", param="attention")
    return choice


def available(device: str) -> dict[str, str]:
    """Each backend and whether it can run on `device` (for `genkit info`)."""
    problem = xformers_problem(device)
    return {
        "sdpa": "yes",
        "sliced": "yes",
        "math": "yes",
        "xformers": "yes" if problem is None else f"no: {problem}",
        "auto": "xformers" if problem is None else "sdpa",
    }
