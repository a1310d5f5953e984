"""Same pixels at any batch size: never let a convolution or linear layer see a batch of one.

oneDNN and MKL take a different code path when a convolution has one image, or a matrix
product has one row (gemv instead of gemm). That path sums in another order, so an image
made alone differs from the same image made in a batch by about 1e-6, enough to flip a few
8-bit pixels. Measured on the tiny SD fixture (CPU, torch 2.13): batch 8 against eight
batches of 1 differed by up to 9.5e-7 in the UNet and 1.5e-5 in the VAE, while batch 8
against four batches of 2, or two of 4, was bitwise equal.

So while this mode is active, a convolution, linear layer, normalisation or attention call on a
batch of one runs on two copies of its input and keeps the first. Only batch-of-one calls pay.

Element-wise kernels have the same weakness at a tensor's end: the last `numel % 16` values go
through a scalar loop (another sigmoid/exp than the vectorised one), so a prompt's embedding
depended on whether it was the last row of the batch (CLIP's QuickGELU: 1.5e-8, enough to flip a
pixel once the UNet ran channels-last). `rows_apart` therefore runs a text encoder on each
distinct prompt alone, as two copies, so a prompt's embedding never depends on its batch-mates.
"""

from __future__ import annotations

from contextlib import contextmanager

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


@contextmanager
def rows_apart(*modules):
    """While active, each module's forward runs once per distinct batch row, on two copies of it."""
    patched = [(m, m.__dict__.get("forward")) for m in modules if m is not None]
    for module, _ in patched:
        module.forward = _row_by_row(module.forward)  # wraps accelerate's offload hook too, if any
    try:
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward  # the class's forward again
            else:
                module.forward = own


def _row_by_row(forward):
    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.dim() >= 1]
        if not tensors:
            return forward(*args, **kwargs)
        size = tensors[0].shape[0]
        tensors = [t for t in tensors if t.shape[0] == size]

        def row(x, i):
            return x[i:i + 1].expand(2, *x.shape[1:]).contiguous() if torch.is_tensor(x) and x.dim() >= 1 and \
                x.shape[0] == size else x

        done, rows = {}, []
        for i in range(size):
            key = tuple(tuple(t[i].flatten().tolist()) for t in tensors)  # token ids, masks (any dtype)
            if key not in done:
                done[key] = forward(*(row(a, i) for a in args), **{k: row(v, i) for k, v in kwargs.items()})
            rows.append(done[key])
        return _first_rows(rows)

    return run


def _first_rows(outputs):
    """Row 0 of each output (a tensor, a tuple/list of them, or a transformers ModelOutput), stacked."""
    first = outputs[0]
    if torch.is_tensor(first):
        return torch.cat([o[:1] for o in outputs]) if first.dim() >= 1 else first
    if isinstance(first, dict):  # ModelOutput is a dict subclass that keeps its fields' order
        return type(first)(**{k: _first_rows([o[k] for o in outputs]) for k in first.keys()})
    if isinstance(first, (tuple, list)):
        return type(first)(_first_rows(list(parts)) for parts in zip(*outputs))
    return first
