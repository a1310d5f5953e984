"""Many processes through accelerate: `accelerate launch -m genkit generate ...` splits the work.

Under `accelerate launch` (or torchrun) every process plans the same jobs, takes its own
contiguous share (`PartialState.split_between_processes`: no gaps, no duplicates), and makes
each image with the seed it has in a one-process run, so the union of the outputs equals a
single-process run pixel for pixel. Outside a launcher nothing here starts a process group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from genkit.errors import GenkitError


def launched() -> bool:
    """True inside a multi-process launch (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state():
    """accelerate's PartialState for a multi-process launch, else None."""
    if not launched():
        return None
    import torch
    from accelerate import PartialState

    # accelerate picks the gloo backend for CPU processes only when told cpu=True
    return PartialState(cpu=not torch.cuda.is_available())


def share(jobs: list, partial_state) -> list:
    if partial_state is None:
        return jobs
    with partial_state.split_between_processes(jobs) as mine:
        return list(mine)


def rank_prefix() -> str:
    """'process 1 of 2: ' inside a launch, so an error names the rank that failed."""
    if not launched():
        return ""
    return f"process {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}: "


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less `name VALUE` and `name=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            kept.append(arg)
    return kept


def relaunch(processes: int, argv: list[str]) -> int:
    """Run `genkit <argv>` again under `accelerate launch` with `processes` processes; return its exit code."""
    if processes < 1:
        raise GenkitError(f"must be at least 1, got {processes}", param="processes")

    # --multi_gpu selects torchrun's launcher, which also starts CPU processes (accelerate's --cpu flag
    # would run a single process); genkit then joins them with gloo on a machine without CUDA
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "genkit", *argv]
    if shutil.which(sys.executable) is None:
        raise GenkitError("cannot find the Python interpreter to relaunch with accelerate")
    return subprocess.call(command)
