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
import os
import sys
import time
from typing import NamedTuple

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
    """Width and height within checks.max_side(), and a lower bound of a batch's memory at that size within what
    is free, before any tensor is allocated (100000 px wide filled 6 GB and never finished).

    The bound: the full-size feature maps of the VAE decoder (or of a pixel-space denoiser) at its narrowest
    block's channels, three alive at once (a resnet's input, its normalised copy, its output), per image of
    the batch. Real peaks are several times higher; this refuses only what cannot fit at all.
    """
    from genkit.checks import check_side
    from genkit.errors import GenkitError, term

    check_side(width, "width")
    check_side(height, "height")
    needed = size_memory(pipeline, width, height, batch_size)
    free = available_memory(pipeline.device) if needed else None
    if free is not None and needed > free:
        raise GenkitError(f"{width}x{height} at batch size {batch_size} needs at least {needed / 2**30:.1f} GiB and "
                          f"{free / 2**30:.1f} GiB is free on {pipeline.device} (lower {term('width')}/{term('height')} or "
                          f"{term('batch_size')}, or free memory)")


def size_memory(pipeline, width: int, height: int, batch_size: int) -> int:
    """check_size's lower bound in bytes (0 when the model names no block widths)."""
    module = getattr(pipeline.pipe, "vae", None) or pipeline.denoiser
    config = getattr(module, "config", None) or {}
    channels = [c for key in ("block_out_channels", "decoder_block_out_channels") for c in (config.get(key) or ())]
    if not channels:
        return 0
    itemsize = getattr(pipeline.dtype, "itemsize", 4)
    return 3 * batch_size * min(channels) * width * height * itemsize


# -- threads on a busy machine ---------------------------------------------------------------------------------
# OpenMP threads spin-wait for each other at every parallel region's end: with one other process busy on a
# 2-core machine, genkit-mini at two threads made 0.42 images/s and at one 0.83 (issue 16;
# benchmarks/busy_machine.py measures it on yours). So the thread count comes from the cores free now.


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(seconds: float = 0.25) -> float | None:
    """How many of this process's usable cores other processes kept busy over `seconds` (/proc/stat's per-core
    lines), or None off Linux."""
    try:
        mine = {f"cpu{n}" for n in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        mine = None

    def sample() -> tuple[int, int]:
        busy = total = 0
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                name, *values = line.split()
                if not name.startswith("cpu") or name == "cpu" or (mine is not None and name not in mine):
                    continue
                fields = [int(v) for v in values[:8]]
                idle = fields[3] + fields[4]  # idle + iowait
                busy, total = busy + sum(fields) - idle, total + sum(fields)
        return busy, total

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cores = len(mine) if mine else (os.cpu_count() or 1)
    return (busy1 - busy0) / (total1 - total0) * cores


def free_cores(seconds: float = 0.25) -> int:
    """Usable cores less those other processes keep busy (at least 1); this process is idle while it measures."""
    cores = usable_cores()
    busy = busy_cores(seconds)
    if busy is None:
        return cores
    return max(1, min(cores, cores - int(busy + 0.5)))


def parse_threads(value) -> int | str | None:
    """`--threads` / $GENKIT_THREADS: a whole number >= 1, "auto", or None (unset)."""
    from genkit.errors import GenkitError, term

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1 or isinstance(value, bool) or (isinstance(value, float) and value != threads):
        raise GenkitError(f"must be a whole number (1 or more) or 'auto', got {value!r} (e.g. {term('threads')} 2; "
                          f"this machine has {usable_cores()} usable cores)", param="threads")
    return threads


class Threads(NamedTuple):
    count: int  # torch's CPU threads from now on
    why: str  # how they were chosen
    advice: str | None = None  # for the user, when fewer cores are free than threads (--exact keeps the count)


def choose_threads(value=None, *, exact: bool = False) -> Threads:
    """Set torch's CPU thread count from `value` (or $GENKIT_THREADS); return it and why.

    N: N threads. "auto": the cores free now. Unset: "auto" for --fast, never above torch's current count (so
    a caller's torch.set_num_threads(1) holds); for --exact (the default) torch's count stays, since images
    differ by a level between thread counts (measured: tiny SD and genkit-mini, 1 vs 2 threads), and a run
    must not change its pixels with the machine's load. There, when fewer cores are free than threads,
    `advice` says so and how to choose (genkit.load prints it). Records store the count (`threads`).
    """
    import torch

    chosen = parse_threads(value) or parse_threads(os.environ.get("GENKIT_THREADS"))
    current = torch.get_num_threads()
    if isinstance(chosen, int):
        threads, why, advice = chosen, "--threads / GENKIT_THREADS", None
    elif chosen == "auto" or not exact:
        if chosen is None and current == 1:  # nothing to lower: skip the measurement
            return Threads(1, "auto: torch is set to one thread")
        free = free_cores()
        threads = free if chosen == "auto" else min(current, free)
        why, advice = f"auto: {free} of {usable_cores()} cores free", None
    else:
        free = free_cores() if current > 1 else current
        threads, why, advice = current, "torch's count (--exact)", None
        if free < current:
            advice = (f"{current - free} of {usable_cores()} cores are busy, and {current} threads wait for them; "
                   f"--threads {free} (or GENKIT_THREADS=auto) is faster, with images a level apart from "
                   f"{current}-thread ones")
    if threads != current:
        torch.set_num_threads(threads)
    return Threads(threads, why, advice)
