"""Same pixels at any batch size: every shape-sensitive op sees the same shape, whatever the batch.

oneDNN and MKL choose code paths and blockings from a tensor's shape: a convolution on one image
takes another path than on two (measured on the tiny SD fixture: 9.5e-7 in the UNet, 1.5e-5 in the
VAE), and on CPUs without AVX-512 a batch of 8 sums in another order than a batch of 2. Tuning for
one batch shape is not enough, so `BatchInvariant` runs convolutions, linear layers,
normalisations, attention and batched matrix products on fixed blocks of `ROWS` rows.

Element-wise kernels have the same weakness at a tensor's end: the last `numel % 16` values go
through a scalar loop (another sigmoid/exp than the vectorised one), so a prompt's embedding
depended on whether it was the last row of the batch (CLIP's QuickGELU: 1.5e-8, enough to flip a
pixel once the UNet ran channels-last). `rows_apart` therefore runs a text encoder on each
distinct prompt alone, as two copies, so a prompt's embedding never depends on its batch-mates.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROWS = 2  # every shape-sensitive op runs on exactly this many rows: a guidance pair, or a row and its copy

# op -> positions of the arguments that carry the batch dimension
_BATCHED_ARGS = {
    F.conv1d: (0,), F.conv2d: (0,), F.conv3d: (0,), F.conv_transpose2d: (0,),
    F.linear: (0,), F.group_norm: (0,), F.layer_norm: (0,),
    F.scaled_dot_product_attention: (0, 1, 2), torch.bmm: (0, 1), torch.baddbmm: (0, 1, 2),
    torch.matmul: (0, 1),
}


class BatchInvariant(TorchFunctionMode):
    """While active, the ops above run on fixed blocks of ROWS rows of their leading dimension.

    oneDNN and MKL choose their blocking (and so the order they sum in) from the whole shape: a
    convolution on 8 images and the same one on 2 sum in different orders on some CPUs (measured: AMD
    EPYC without AVX-512, one level in a few pixels). Here every such call sees exactly ROWS rows,
    whatever the batch: a batch is cut into blocks of ROWS, the last block padded with copies of its
    last row, so the kernel, its blocking and its threads' split are the same for every image of every
    batch size. Rows never mix in these ops, and a block computes its rows alike (the property test in
    tests/test_exactness.py checks it on random architectures).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ELEMENTWISE:
            return _row_aligned(func, args, kwargs)
        positions = _BATCHED_ARGS.get(func)
        lead = args[0] if args else None
        if positions is None or not torch.is_tensor(lead) or lead.dim() < 2 or lead.shape[0] == ROWS:
            return func(*args, **kwargs)
        rows = lead.shape[0]
        batched = [i for i in positions if _carries(args[i] if i < len(args) else None, rows)]
        masks = [k for k in _BATCHED_KWARGS if _carries(kwargs.get(k), rows)]
        if any(i < len(args) and torch.is_tensor(args[i]) and i not in batched and args[i].shape[0] != 1
               for i in positions):
            return func(*args, **kwargs)  # leading sizes that do not line up: not a batch
        outputs = []
        for start in range(0, rows, ROWS):
            block, block_kwargs = list(args), dict(kwargs)
            for i in batched:
                block[i] = _block(args[i], start)
            for k in masks:
                block_kwargs[k] = _block(kwargs[k], start)
            outputs.append(func(*block, **block_kwargs)[:min(ROWS, rows - start)])
        return torch.cat(outputs)


# Element-wise functions whose vectorised loop and scalar tail compute differently (Sleef's exp, tanh, erf ... in
# SIMD lanes, libm in the tail): a value's result depends on where it falls against the vector width, so on its
# row's position in the batch unless every row starts and ends on a whole vector. Measured on an Intel Xeon with
# AVX-512 (16 floats a vector): outpainted SD/SDXL images and a random Flux architecture one level apart between
# a batch and the same images alone, while AVX2 (8 floats), where those rows were whole vectors, agreed.
_ELEMENTWISE = {F.silu, F.gelu, F.mish, F.softplus, torch.sigmoid, torch.tanh, torch.exp, torch.erf, torch.rsqrt,
                torch.sqrt, torch.sin, torch.cos, torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.exp,
                torch.Tensor.erf, torch.Tensor.rsqrt, torch.Tensor.sqrt, torch.Tensor.sin, torch.Tensor.cos}
ALIGN = 64  # floats: a whole number of vectors on every x86 and Arm SIMD width torch uses


def _row_aligned(func, args, kwargs):
    """`func` on each row of its input laid out alone, padded to a multiple of ALIGN values: every value meets the
    same code path whatever the batch, its row's position in it, or the row's length."""
    x = args[0] if args else None
    if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point() or x.numel() == 0 or "out" in kwargs:
        return func(*args, **kwargs)
    kwargs = dict(kwargs)  # the caller's dict stays as it was
    inplace = kwargs.pop("inplace", False)
    rows, width = x.shape[0], x[0].numel()
    padded = -(-width // ALIGN) * ALIGN
    flat = x.new_zeros((rows, padded))
    flat[:, :width] = x.reshape(rows, width)
    out = func(flat, *args[1:], **kwargs)[:, :width].reshape(x.shape)
    if inplace:
        return x.copy_(out)
    return torch.empty_like(x).copy_(out)  # in x's memory layout, as the function itself answers (kernels pick by it)


_BATCHED_KWARGS = ("attn_mask",)  # scaled_dot_product_attention's mask (one per row, or broadcast with size 1)


def _carries(x, rows: int) -> bool:
    return torch.is_tensor(x) and x.dim() >= 2 and x.shape[0] == rows


def _block(x: torch.Tensor, start: int) -> torch.Tensor:
    """Rows start..start+ROWS of x, padded with copies of its last row, in x's memory layout (kernels pick by stride)."""
    part = x[start:start + ROWS]
    if part.shape[0] == ROWS:
        return part
    inner = sorted(range(1, x.dim()), key=lambda d: (-x.stride(d), d))  # outermost first
    y = torch.empty_permuted((ROWS, *x.shape[1:]), (0, *inner), dtype=x.dtype, device=x.device)
    y[:part.shape[0]] = part
    y[part.shape[0]:] = part[-1]
    return y


@contextmanager
def rows_apart(*modules, memo: dict | None = None):
    """While active, each module's forward runs once per distinct batch row, on two copies of it.

    With `memo` (a dict the caller keeps for a whole run), a row already encoded in an earlier batch of
    the run is not encoded again: each distinct prompt and negative prompt is encoded once per run (the
    newest MEMO_ROWS rows per module are kept, so a run of 100,000 prompts does not keep them all).
    """
    patched = [(m, m.__dict__.get("forward")) for m in modules if m is not None]
    for module, _ in patched:
        done = memo.setdefault(id(module), OrderedDict()) if memo is not None else OrderedDict()
        module.forward = _row_by_row(module.forward, done)  # wraps accelerate's offload hook too, if any
    try:
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward  # the class's forward again
            else:
                module.forward = own


MEMO_ROWS = 256


def _row_by_row(forward, done: OrderedDict):
    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.dim() >= 1]
        if not tensors:
            return forward(*args, **kwargs)
        size = tensors[0].shape[0]
        tensors = [t for t in tensors if t.shape[0] == size]
        options = repr([(k, v) for k, v in (*enumerate(args), *kwargs.items()) if not torch.is_tensor(v)])

        def row(x, i):
            return x[i:i + 1].expand(2, *x.shape[1:]).contiguous() if torch.is_tensor(x) and x.dim() >= 1 and \
                x.shape[0] == size else x

        rows = []
        for i in range(size):
            key = (options, *(tuple(t[i].flatten().tolist()) for t in tensors))  # token ids, masks (any dtype)
            if key in done:
                done.move_to_end(key)
            else:
                done[key] = forward(*(row(a, i) for a in args), **{k: row(v, i) for k, v in kwargs.items()})
                if len(done) > MEMO_ROWS:
                    done.popitem(last=False)
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
