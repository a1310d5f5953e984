"""Training checkpoints that survive a crash: written whole through `genkit.outputs.atomic_folder`, then rotated.

Everything is safetensors (tensors) plus JSON (counters, schedules): no pickle anywhere, so a
checkpoint can be opened without trusting it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from genkit.outputs import atomic_folder

PREFIX = "checkpoint-"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer's state into flat tensors and JSON-able parts."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(out_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict, keep: int = 2) -> Path:
    """Write `checkpoint-<step>/` atomically, then delete all but the newest `keep` complete ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{PREFIX}{step:07d}"

    def write(tmp: Path) -> None:
        for name, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))

    atomic_folder(final, write)
    for old in complete(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.glob(f"{PREFIX}*") if (p / "state.json").is_file())


def latest(out_dir: Path) -> Path | None:
    found = complete(out_dir)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    return tensors, json.loads((path / "state.json").read_text())
