"""LoRA adapters at generation time: `--lora PATH[:SCALE]`, several at once, loudly checked.

Files in diffusers/peft layout (`pytorch_lora_weights.safetensors`) and kohya's layout
(`lora_unet_...lora_down.weight`) both load through diffusers' loaders, which convert kohya
keys and read the adapter's rank and alpha from the safetensors header. diffusers drops keys
that match no layer with at most a log line, so a LoRA made for another base silently does
nothing; genkit first checks every layer the file names against the model (the layer must
exist and its shapes must fit) and refuses a file that does not fit, saying how many matched.
Only then does it load the adapter, and it counts the layers that received it once more.

genkit-mini and PixArt-Sigma take denoiser LoRAs only (PixArt through peft directly, since diffusers
has no loader for it); the other pipelines load through their own diffusers loader. LoKr and LoHa files as peft saves
them (`<layer>.lokr_w1`, `<layer>.hada_w1_a`, ..., their peft config in the header, what `genkit train lora` writes
with lora.adapter = lokr / loha) are checked the same way and put in place with peft.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from genkit.errors import GenkitError, first_line, term
from genkit.families.base import LORA_COMPONENTS

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_SUFFIXES = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)(\.[\w]+)?\.weight$|\.alpha$|"
                       r"\.(lokr_w[12](_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12])$")
_LYCORIS = re.compile(r"^(.*)\.(lokr_w[12](?:_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12])$")  # peft's LoKr and LoHa


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class Fit:
    """How a LoRA's layers line up with a model: `matched` of `wanted` fit; `miss` names one that did not."""

    matched: int
    wanted: int
    miss: str | None = None


MAX_SCALE = 10.0  # |scale|: 1 is the adapter at full strength; far past a few it only paints noise


def parse_spec(text: str | LoraSpec) -> LoraSpec:
    """`PATH` or `PATH:SCALE` (a path containing ':' works when the part after it is not a number).

    The scale must be a finite number from -MAX_SCALE to MAX_SCALE; `PATH:abc` where PATH exists says that
    abc is not a number (rather than that no file `PATH:abc` exists).
    """
    if isinstance(text, LoraSpec):
        check_scale(text.scale, text.path)
        return text
    path, scale = str(text), 1.0
    head, sep, tail = path.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            if not Path(path).expanduser().exists() and Path(head).expanduser().exists():
                raise GenkitError(f"{text}: the scale {tail!r} after the last ':' is not a number "
                                  f"(write {head}:0.8, or {head} for scale 1)", param="lora") from None
    check_scale(scale, path)
    return LoraSpec(Path(path).expanduser(), scale)


def check_scale(scale: float, path) -> None:
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise GenkitError(f"{path}: scale must be a finite number from -{MAX_SCALE:g} to {MAX_SCALE:g}, got "
                          f"{scale:g} (1 is full strength; most adapters work from 0.5 to 1.2)", param="lora")


def weights_file(path: Path, allow_pickle: bool = False) -> Path:
    if path.is_dir():
        candidates = [path / WEIGHTS_NAME, *sorted(path.glob("*.safetensors"))]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            pickles = sorted(path.glob("*.bin"))
            if pickles and allow_pickle:
                return pickles[0]
            hint = f" (it holds only .bin pickles; pass {term('allow_pickle')} if you trust them)" if pickles else ""
            raise GenkitError(f"{path}: no .safetensors file in the folder{hint}", param="lora")
        return found
    if not path.is_file():
        raise GenkitError(f"{path}: no such file or folder", param="lora")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise GenkitError(f"{path} is not a .safetensors file; pickle files can run code when loaded "
                          f"(convert it, or pass {term('allow_pickle')} if you trust it)", param="lora")
    return path


def check_safetensors(file: Path) -> None:
    """Read a .safetensors file's header (not its tensors): a file that is not one gets one line, not a traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise GenkitError(f"{file} is not a valid safetensors file ({first_line(exc)}); pass the LoRA's "
                          ".safetensors file as it was saved (is it truncated, or another format renamed?)", param="lora") from None


def layer_names(state_dict: dict) -> set[str]:
    """The distinct layers a LoRA state dict names (A/B or down/up pairs and alphas count once)."""
    return {_SUFFIXES.sub("", key) for key in state_dict if _SUFFIXES.search(key)}


def read(file: Path, pipe, family) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers layout, network alphas, adapter metadata); kohya keys are converted."""
    from safetensors import SafetensorError

    extra = family.lora_read_args(pipe)
    try:
        parts = family.lora_loader(pipe).lora_state_dict(str(file.parent), weight_name=file.name, return_lora_metadata=True,
                                       use_safetensors=file.suffix == ".safetensors", **extra)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError, SafetensorError) as exc:
        raise GenkitError(f"{file}: cannot read it as a LoRA ({first_line(exc)})", param="lora") from None
    if len(parts) == 2:  # transformer loaders keep no network alphas
        return parts[0], None, parts[1]
    return parts


def peft_names(component: str, part: dict) -> dict:
    """One component's keys (its prefix removed) in peft's names (`<layer>.lora_A.weight`), as diffusers' loaders
    convert them; a layout the converters do not know is returned as it is."""
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)

    try:
        if component in ("unet", "transformer"):
            return convert_unet_state_dict_to_peft(part)
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    except ValueError:
        return part


def is_lycoris(state_dict: dict) -> bool:
    """Whether a state dict holds peft's LoKr or LoHa factors (rather than LoRA's A and B)."""
    return any(_LYCORIS.match(key) for key in state_dict)


def _lycoris_shape(factors: dict) -> tuple:
    """(output width, weight elements) of the update one layer's LoKr or LoHa factors make."""
    def size(shape):
        return math.prod(shape)

    if "hada_w1_a" in factors:  # the Hadamard product of (w1_a @ w1_b) and (w2_a @ w2_b), each the weight's shape
        out = factors["hada_w1_a"][0]
        return out, out * size(factors["hada_w1_b"][1:])
    first = factors.get("lokr_w1") or (factors["lokr_w1_a"][0], factors["lokr_w1_b"][-1])  # kron(w1, w2)
    if "lokr_w2" in factors:
        second = factors["lokr_w2"]
    else:
        second = (factors["lokr_w2_a"][0], *factors["lokr_w2_b"][1:])
    return first[0] * second[0], size(first) * size(second)


def _peft_layers(component: str, part: dict) -> dict[str, tuple]:
    """{layer path: (lora_A shape, lora_B shape)} of one component's keys, after diffusers' conversions; a LoKr or
    LoHa layer's (output width, weight elements) as ("lycoris", shape)."""
    if is_lycoris(part):
        factors: dict[str, dict] = {}
        for key, value in part.items():
            if match := _LYCORIS.match(key):
                factors.setdefault(match.group(1), {})[match.group(2)] = tuple(value.shape)
        return {name: ("lycoris", _lycoris_shape(found)) for name, found in factors.items()}
    layers: dict[str, list] = {}
    for key, value in peft_names(component, part).items():
        match = re.match(r"^(.*)\.lora_([AB])(\.[\w]+)?\.weight$", key)
        if match:
            layers.setdefault(match.group(1), [None, None])["AB".index(match.group(2))] = tuple(value.shape)
    return {name: tuple(shapes) for name, shapes in layers.items()}


def _fits(module, shapes: tuple) -> bool:
    """A LoRA pair fits a layer when A reads the layer's input width and B writes its output width."""
    a, b = shapes
    if a == "lycoris":
        weight = getattr(module, "weight", None)
        return weight is not None and (weight.shape[0], weight.numel()) == b
    width_in = getattr(module, "in_features", getattr(module, "in_channels", None))
    width_out = getattr(module, "out_features", getattr(module, "out_channels", None))
    return a is not None and b is not None and width_in == a[1] and width_out == b[0]


def check_fit(state_dict: dict, pipe, family) -> Fit:
    """Count the layers of a (diffusers-layout) LoRA state dict that exist in `pipe` with fitting shapes."""
    accepted = family.lora_components(pipe)
    matched, wanted, miss = 0, 0, None
    claimed = set()
    for component in accepted:
        prefix = f"{component}."
        part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        claimed |= {k for k in state_dict if k.startswith(prefix)}
        modules = dict(getattr(pipe, component).named_modules())
        for name, shapes in sorted(_peft_layers(component, part).items()):
            wanted += 1
            # CLIP's layers are `text_model.encoder...` in LoRA files; transformers 5 names them `encoder...`
            module = modules.get(name) or modules.get(f"text_model.{name}") or \
                modules.get(name.removeprefix("text_model."))
            if module is not None and _fits(module, shapes):
                matched += 1
            elif miss is None:
                miss = f"{prefix}{name}" + (" (shapes differ)" if module is not None else "")
    stray = layer_names({k: v for k, v in state_dict.items() if k not in claimed})
    wanted += len(stray)
    if stray and miss is None:
        miss = sorted(stray)[0]
    return Fit(matched, wanted, miss)


def text_encoder_problem() -> str | None:
    """Why transformers cannot take text-encoder adapters here (it needs a newer peft), or None."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return None
    import peft
    import transformers
    from packaging.version import Version

    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        return (f"transformers {transformers.__version__} needs peft >= {MIN_PEFT_VERSION} for text-encoder adapters "
                f"and peft {peft.__version__} is installed")
    return None


def _adapter_layers(pipe, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for name in LORA_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for layer in module.modules():  # lora_A, or LoKr's lokr_w1 / LoHa's hada_w1_a, ...
            if isinstance(layer, BaseTunerLayer) and any(adapter in getattr(layer, attr, {})
                                                         for attr in layer.adapter_layer_names):
                count += 1
    return count


def _load_lycoris(pipe, family, state_dict: dict, metadata: dict | None, adapter: str) -> None:
    """A LoKr or LoHa file into each component it names, with the peft config stored beside it (diffusers loads
    LoKr alone, and not into every family)."""
    from peft import PeftConfig, set_peft_model_state_dict

    metadata = metadata or {}
    for component in family.lora_components(pipe):
        part = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        saved = {k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")}
        if "peft_type" not in saved:
            raise ValueError(f"its {component} LoKr/LoHa layers come without their peft config (the header's "
                             "lora_adapter_metadata), which says their rank, alpha and factorisation")
        config = PeftConfig.from_peft_type(**saved)
        module = getattr(pipe, component)
        if hasattr(module, "add_adapter"):  # diffusers' and transformers' peft mixins keep their adapter lists
            module.add_adapter(config, adapter_name=adapter)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, module, adapter_name=adapter)
        result = set_peft_model_state_dict(module, part, adapter_name=adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{len(result.unexpected_keys)} keys fit no layer, e.g. {result.unexpected_keys[0]}")


def _load(pipe, family, file: Path, state_dict: dict, alphas, metadata, adapter: str) -> None:
    with warnings.catch_warnings():  # several adapters in one model are what --lora asks for
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        if is_lycoris(state_dict):
            _load_lycoris(pipe, family, state_dict, metadata, adapter)
        else:
            family.load_lora(pipe, file, state_dict, alphas, metadata, adapter)


def inject_peft(model, state_dict: dict, prefix: str, metadata: dict | None, adapter: str) -> None:
    """Add adapter `adapter` to `model` with peft and load its weights (keys `<prefix>.<layer>.lora_A.weight`)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    part = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    layers = {_SUFFIXES.sub("", k) for k in part}
    ranks = {v.shape[0] for k, v in part.items() if ".lora_A." in k}
    metadata = metadata or {}  # peft's LoraConfig as diffusers stores it: flat keys `<prefix>.r`, `<prefix>.lora_alpha`
    saved = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")} or metadata
    config = LoraConfig(**{k: v for k, v in saved.items() if k in ("r", "lora_alpha", "target_modules")}) if \
        "r" in saved else LoraConfig(r=max(ranks), lora_alpha=max(ranks), target_modules=sorted(layers))
    inject_adapter_in_model(config, model, adapter_name=adapter)
    result = set_peft_model_state_dict(model, part, adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{len(result.unexpected_keys)} keys fit no layer, e.g. {result.unexpected_keys[0]}")


# diffusers' converter renames only the attention projections' adapters (`to_q.lora_A` -> `to_q.lora.down`) and
# leaves feed-forward and convolution ones in peft's names; its loader decides from the first key alone whether to
# rename, so a file that mixes both layouts loses the layers of the other kind. genkit writes and loads one layout.
_LAYOUTS = {".lora_A.": ".lora.down.", ".lora_B.": ".lora.up."}


def diffusers_layout(state_dict: dict) -> dict:
    """Every peft `lora_A`/`lora_B` key as diffusers' `lora.down`/`lora.up` (what genkit's trainer writes)."""
    return {_rename(k, _LAYOUTS): v for k, v in state_dict.items()}


def peft_layout(state_dict: dict) -> dict:
    """Every `lora.down`/`lora.up` key as peft's `lora_A`/`lora_B` (what genkit-mini's loader is given)."""
    return {_rename(k, {b: a for a, b in _LAYOUTS.items()}): v for k, v in state_dict.items()}


def _rename(key: str, mapping: dict) -> str:
    for old, new in mapping.items():
        key = key.replace(old, new)
    return key


def _unload(pipe, family, adapter: str) -> None:
    """Remove a half-loaded adapter, so a caller that catches the error keeps a working pipeline."""
    try:
        family.unload_lora(pipe, adapter)
    except (ValueError, KeyError, AttributeError):
        pass


def apply(pipeline, specs: list[LoraSpec], *, allow_pickle: bool = False) -> None:
    """Load each adapter into `pipeline` (a genkit Pipeline) and activate them with their scales."""
    pipe, family, names, scales = pipeline.pipe, pipeline.family, [], []
    for number, spec in enumerate(specs):
        file = weights_file(spec.path, allow_pickle)
        if file.suffix == ".safetensors":
            check_safetensors(file)
        state_dict, alphas, metadata = read(file, pipe, family)
        fit = check_fit(state_dict, pipe, family)
        if fit.wanted == 0:
            raise GenkitError(f"{spec.path}: the file holds no LoRA weights (no lora_A/lora_B, lora_down/lora_up, "
                              "lokr_w1/lokr_w2 or hada_w1_a/... keys)", param="lora")
        if fit.matched < fit.wanted:
            raise GenkitError(f"{spec.path} does not fit {pipeline.name}: {fit.matched} of its {fit.wanted} "
                              f"layers matched the model (first that did not: {fit.miss}; was it trained for "
                              "another base model?)", param="lora")
        problem = text_encoder_problem() if any(k.startswith("text_encoder") for k in state_dict) else None
        if problem:
            raise GenkitError(f"{spec.path} holds text-encoder layers, but {problem} (upgrade peft)", param="lora")
        adapter = f"lora{number}_{re.sub(r'[^A-Za-z0-9_]', '_', spec.path.stem)}"
        try:
            _load(pipe, family, file, state_dict, alphas, metadata, adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            _unload(pipe, family, adapter)
            raise GenkitError(f"{spec.path} does not fit {pipeline.name}: {first_line(exc)}", param="lora") from None
        loaded = _adapter_layers(pipe, adapter)
        if loaded < fit.wanted:
            _unload(pipe, family, adapter)
            raise GenkitError(f"{spec.path} does not fit {pipeline.name}: {loaded} of its {fit.wanted} layers "
                              "received the adapter", param="lora")
        names.append(adapter)
        scales.append(spec.scale)
        pipeline.loras.append({"name": spec.path.stem if spec.path.is_file() else spec.path.name,
                               "path": str(spec.path), "scale": spec.scale, "sha256": _digest(file)})
    if names:
        family.set_loras(pipe, names, scales)


def _digest(file: Path) -> str:
    from genkit.files import file_sha256

    return file_sha256(file)[:12]
