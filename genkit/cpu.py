"""Keep freed memory in the process: 15% more images/s for genkit-mini on a CPU, same pixels.

glibc hands every freed block above its mmap threshold (128 KiB, rising to at most 32 MiB) back
to the kernel, so each denoising step's activations land on fresh pages and every first touch
is a page fault. A genkit-mini UNet forward at batch 100 allocates and frees hundreds of MB.
Serving all sizes from the heap and never trimming it (what jemalloc and tcmalloc do by default)
took genkit-mini from 3.19 to 3.67 images/s on 2 cores (benchmarks/genkit_mini_speed.py prints
the ratio on your machine). The cost: the process keeps its peak memory until it exits.

Also measured and left out: channels-last UNets (+5%) made images of the same seed differ by one
level between a one-process and a two-process run (the batch splits differ); a matmul-then-add in
place of addmm, faster alone on the widest linear layer, was within noise in the whole pipeline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_done = False


def keep_freed_memory() -> bool:
    """Keep freed memory in this process's heap (glibc on Linux); True when the setting took."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Every size from the heap (no mmap per tensor), and never trim it (mallopt takes an int).
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done


def available_memory(device: str = "cpu") -> int | None:
    """Bytes a new allocation can take now: the CUDA device's free memory, else the kernel's MemAvailable
    (capped by this process's RLIMIT_AS); None where neither is known."""
    if str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    found = None
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            left = max(0, limit - _address_space())
            found = left if found is None else min(found, left)
    except (ImportError, OSError, ValueError):
        pass
    return found


def _address_space() -> int:
    """This process's mapped address space in bytes (VmSize), what RLIMIT_AS counts."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def check_size(pipeline, width: int, height: int, batch_size: int) -> None:
    """Width and height within prompts.max_side(), and a lower bound of a batch's memory at that size within what
    is free, before any tensor is allocated (100000 px wide filled 6 GB and never finished).

    The bound: the full-size feature maps of the VAE decoder (or of a pixel-space denoiser) at its narrowest
    block's channels, three alive at once (a resnet's input, its normalised copy, its output), per image of
    the batch. Real peaks are several times higher; this refuses only what cannot fit at all.
    """
    from genkit.errors import GenkitError
    from genkit.prompts import check_side

    check_side(width, "width")
    check_side(height, "height")
    needed = size_memory(pipeline, width, height, batch_size)
    free = available_memory(pipeline.device) if needed else None
    if free is not None and needed > free:
        raise GenkitError(f"{width}x{height} at batch size {batch_size} needs at least {needed / 2**30:.1f} GiB and "
                          f"{free / 2**30:.1f} GiB is free on {pipeline.device} (lower --width/--height or "
                          "--batch-size, or free memory)")


def size_memory(pipeline, width: int, height: int, batch_size: int) -> int:
    """check_size's lower bound in bytes (0 when the model names no block widths)."""
    module = getattr(pipeline.pipe, "vae", None) or pipeline.denoiser
    config = getattr(module, "config", None) or {}
    channels = [c for key in ("block_out_channels", "decoder_block_out_channels") for c in (config.get(key) or ())]
    if not channels:
        return 0
    itemsize = getattr(pipeline.dtype, "itemsize", 4)
    return 3 * batch_size * min(channels) * width * height * itemsize
