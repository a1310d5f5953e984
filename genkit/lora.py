"""LoRA adapters at generation time: `--lora PATH[:SCALE]`, several at once, loudly checked.

Files in diffusers/peft layout (`pytorch_lora_weights.safetensors`) and kohya's layout
(`lora_unet_...lora_down.weight`) both load through diffusers' loaders, which convert kohya
keys. diffusers drops keys that match no layer with at most a log line, so a LoRA made for
another base silently does nothing; genkit counts the layers each file names and the layers
that actually received the adapter, and refuses a file that does not fit.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from genkit.errors import GenkitError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_SUFFIXES = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)(\.[\w]+)?\.weight$|\.alpha$")


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0


def parse_spec(text: str | LoraSpec) -> LoraSpec:
    """`PATH` or `PATH:SCALE` (a path containing ':' works when the part after it is not a number)."""
    if isinstance(text, LoraSpec):
        return text
    path, scale = str(text), 1.0
    head, sep, tail = path.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    return LoraSpec(Path(path).expanduser(), scale)


def weights_file(path: Path, allow_pickle: bool = False) -> Path:
    if path.is_dir():
        candidates = [path / WEIGHTS_NAME, *sorted(path.glob("*.safetensors"))]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            pickles = sorted(path.glob("*.bin"))
            if pickles and allow_pickle:
                return pickles[0]
            hint = " (it holds only .bin pickles; pass --allow-pickle if you trust them)" if pickles else ""
            raise GenkitError(f"--lora {path}: no .safetensors file in the folder{hint}")
        return found
    if not path.is_file():
        raise GenkitError(f"--lora {path}: no such file or folder")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise GenkitError(f"--lora {path} is not a .safetensors file; pickle files can run code when loaded "
                          "(convert it, or pass --allow-pickle if you trust it)")
    return path


def layer_names(state_dict: dict) -> set[str]:
    """The distinct layers a LoRA state dict names (A/B or down/up pairs and alphas count once)."""
    return {_SUFFIXES.sub("", key) for key in state_dict if _SUFFIXES.search(key)}


def _adapter_layers(pipe, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "lora_A", {}):
                count += 1
    return count


def _read_state_dict(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    import torch

    return torch.load(file, map_location="cpu", weights_only=True)


def apply(pipeline, specs: list[LoraSpec], *, allow_pickle: bool = False) -> None:
    """Load each adapter into `pipeline` (a genkit Pipeline) and activate them with their scales."""
    pipe, names, scales = pipeline.pipe, [], []
    for number, spec in enumerate(specs):
        file = weights_file(spec.path, allow_pickle)
        state_dict = _read_state_dict(file)
        wanted = len(layer_names(state_dict))
        if wanted == 0:
            raise GenkitError(f"--lora {spec.path}: the file holds no LoRA weights (no lora_A/lora_B or "
                              "lora_down/lora_up keys)")
        adapter = f"lora{number}_{re.sub(r'[^A-Za-z0-9_]', '_', spec.path.stem)}"
        try:
            if hasattr(pipe, "load_lora_weights"):
                pipe.load_lora_weights(dict(state_dict), adapter_name=adapter)
            else:  # genkit-mini: the adapter goes into the decoder
                pipe.unet.load_lora_adapter(dict(state_dict), prefix="unet", adapter_name=adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise GenkitError(f"--lora {spec.path} does not fit {pipeline.name}: {first}") from None
        matched = _adapter_layers(pipe, adapter)
        if matched < wanted:
            raise GenkitError(f"--lora {spec.path} does not fit {pipeline.name}: {matched} of its {wanted} layers "
                              "matched the model (was it trained for another base model?)")
        names.append(adapter)
        scales.append(spec.scale)
        pipeline.loras.append({"name": spec.path.stem if spec.path.is_file() else spec.path.name,
                               "path": str(spec.path), "scale": spec.scale, "sha256": _digest(file)})
    if hasattr(pipe, "set_adapters"):
        pipe.set_adapters(names, adapter_weights=scales)
    else:
        pipe.unet.set_adapters(names, weights=scales)


def _digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]
