"""Same pixels at any batch size: never let a convolution or linear layer see a batch of one.

oneDNN and MKL take a different code path when a convolution has one image, or a matrix
product has one row (gemv instead of gemm). That path sums in another order, so an image
made alone differs from the same image made in a batch by about 1e-6, enough to flip a few
8-bit pixels. Measured on the tiny SD fixture (CPU, torch 2.13): batch 8 against eight
batches of 1 differed by up to 9.5e-7 in the UNet and 1.5e-5 in the VAE, while batch 8
against four batches of 2, or two of 4, was bitwise equal.

So while this mode is active, a convolution, linear layer, normalisation or attention call on a
batch of one runs on two copies of its input and keeps the first. Only batch-of-one calls pay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# op -> positions of the arguments that carry the batch dimension
_BATCHED_ARGS = {
    F.conv1d: (0,), F.conv2d: (0,), F.conv3d: (0,), F.conv_transpose2d: (0,),
    F.linear: (0,), F.group_norm: (0,), F.layer_norm: (0,),
    F.scaled_dot_product_attention: (0, 1, 2), torch.bmm: (0, 1), torch.baddbmm: (0, 1, 2),
}


class BatchInvariant(TorchFunctionMode):
    """While active, the ops above never run on a batch of one: they run on two copies."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions = _BATCHED_ARGS.get(func)
        if positions and all(_is_single(args, i) for i in positions):
            doubled = list(args)
            for i in positions:
                doubled[i] = _doubled(args[i])
            return func(*doubled, **kwargs)[:1]
        return func(*args, **kwargs)


def _doubled(x: torch.Tensor) -> torch.Tensor:
    """Two copies of a batch-of-one tensor in the same memory layout (kernels pick paths by stride)."""
    inner = sorted(range(1, x.dim()), key=lambda d: (-x.stride(d), d))  # outermost first
    y = torch.empty_permuted((2, *x.shape[1:]), (0, *inner), dtype=x.dtype, device=x.device)
    y[0] = x[0]
    y[1] = x[0]
    return y


def _is_single(args, i) -> bool:
    return i < len(args) and torch.is_tensor(args[i]) and args[i].dim() >= 2 and args[i].shape[0] == 1
