"""Quantized weights: weight-only int8 and fp8 (torchao) and nf4 (bitsandbytes) for the denoiser and the text encoders,
and a denoiser read from a GGUF file; all through diffusers' and transformers' own quantization configs (genkit has no
kernels of its own).

- `quantize="int8"` (`--quantize int8`) quantizes the denoiser; `"denoiser=int8,text_encoders=fp8"` names each part,
  and a component's own name (`text_encoder_2=int8`) one component. torchao's int8 and fp8 run on any device (also a
  CPU: each layer dequantizes its weights for the matmul); bitsandbytes' nf4 needs CUDA and is refused elsewhere.
- A `.gguf` file (ComfyUI-GGUF's layout: the original model's key names, quantized tensors) is the denoiser of a base
  pipeline folder: `genkit.load("flux-Q8_0.gguf", base="./flux-folder")` (`--model FILE.gguf --base FOLDER`), read by
  the denoiser class's `from_single_file` with diffusers' `GGUFQuantizationConfig` (each layer dequantizes to the
  compute dtype). The model is then the base folder, and the denoiser's entry in the quantization says the file.

What a loaded pipeline holds is read back off its modules (`describe`), recorded with every image as `quantization`
({component: "int8" | "fp8" | "nf4" | {"gguf": path, "types": [...]}}), and replay loads with it (`plan` accepts it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from genkit.errors import GenkitError, first_line, term

KINDS = ("int8", "fp8", "nf4")  # what --quantize makes
GROUPS = ("denoiser", "text_encoders")  # the parts --quantize names besides components
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
BACKEND = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}


@dataclass
class Plan:
    """What a load quantizes: {component: kind} made at load time, and the GGUF file the denoiser comes from."""

    parts: dict = field(default_factory=dict)
    gguf: Path | None = None
    index: dict = field(default_factory=dict)  # the model's model_index.json

    def __bool__(self) -> bool:
        return bool(self.parts or self.gguf)


def parse(spec) -> dict:
    """{part: kind} of a `quantize` value: one kind (the denoiser), "part=kind,..." (parts: denoiser, text_encoders or a
    component's name), a dict of the same, or a record's {component: kind or {"gguf": path}}; checked in one line."""
    if spec is None or spec == "" or spec == {}:
        return {}
    if isinstance(spec, str):
        text = spec.strip()
        if "=" not in text and "," not in text:
            spec = {"denoiser": text}
        else:
            spec = {}
            for entry in text.split(","):
                part, sep, kind = entry.partition("=")
                if not sep or not part.strip() or part.strip() in spec:
                    raise GenkitError(f"{text!r}: write one kind (the denoiser's), or part=kind pairs separated by "
                                      f"commas, each part once (parts: {', '.join(GROUPS)} or a component's name; "
                                      f"kinds: {', '.join(KINDS)})", param="quantize")
                spec[part.strip()] = kind.strip()
    if not isinstance(spec, dict):
        raise GenkitError(f"{spec!r:.60}: a kind ({', '.join(KINDS)}) or part=kind pairs", param="quantize")
    for part, kind in spec.items():
        if isinstance(kind, dict) and isinstance(kind.get("gguf"), str):
            continue
        if kind not in KINDS:
            raise GenkitError(f"{part}={kind}: {kind!r} is not a quantization genkit makes (kinds: "
                              f"{', '.join(KINDS)}; GGUF files are read with {term('model')} FILE.gguf and "
                              f"{term('base')} FOLDER)", param="quantize")
    return dict(spec)


def gguf_source(name: str | None, base) -> tuple[str | None, Path | None]:
    """(the model to locate, the GGUF file of its denoiser or None) of `genkit.load(name, base=...)`."""
    if not (name and str(name).lower().endswith(".gguf")):
        if base is not None:
            raise GenkitError(f"is the pipeline folder a single-file model (a .gguf denoiser, a .safetensors "
                              f"checkpoint) comes with; {name or 'the model'} is not one (drop {term('base')})",
                              param="base")
        return name, None
    path = Path(name).expanduser()
    if not path.is_file():
        raise GenkitError(f"{name}: no such GGUF file", param="model")
    if base is None:
        raise GenkitError(f"{name} holds the denoiser alone; pass {term('base')} FOLDER, the diffusers pipeline "
                          "folder (or preset, or hub id) its other components come from", param="base")
    _check_gguf(path)
    return str(base), path


def _check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF, or one gguf cannot read, in one line."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GenkitError(f"cannot read {path}: {exc.strerror or exc}", param="model") from None
    if magic != b"GGUF":
        raise GenkitError(f"{path} is not a GGUF file (it does not start with GGUF's magic bytes)", param="model")
    _require("gguf", "GGUF files")


def plan(spec, family, source: str, local: bool, device: str, gguf: Path | None = None) -> Plan:
    """What to quantize of model `source` (a folder, or a hub id when not `local`) for `spec` (`parse`), checked against
    its components, the device and the installed packages before the slow load; `gguf`: the denoiser's GGUF file
    (`gguf_source`). Nothing asked: an empty plan, and the model's files are not read."""
    parts = parse(spec)
    if not parts and gguf is None:
        return Plan()
    from diffusers import DiffusionPipeline

    index = dict(DiffusionPipeline.load_config(source, local_files_only=local))
    denoiser = family.denoiser_name if family is not None else next(
        (name for name in ("transformer", "unet") if isinstance(index.get(name), list)), None)
    encoders = [name for name in TEXT_ENCODERS if isinstance(index.get(name), list) and index[name][0]]
    components = [name for name in (denoiser, *encoders) if name]
    chosen = {}
    for part, kind in parts.items():
        names = [denoiser] if part == "denoiser" else encoders if part == "text_encoders" else [part]
        if part not in GROUPS and part not in components:
            raise GenkitError(f"{part}: this model has no such part to quantize (parts: "
                              f"{', '.join([*GROUPS, *components])})", param="quantize")
        for name in names:
            if isinstance(kind, dict):  # a record's GGUF denoiser
                if name != denoiser:
                    raise GenkitError(f"{name}: only the denoiser is read from a GGUF file", param="quantize")
                gguf = gguf or Path(kind["gguf"])
            else:
                chosen[name] = kind
    if gguf is not None:
        if denoiser in chosen:
            raise GenkitError(f"denoiser={chosen[denoiser]}: the denoiser comes quantized from {gguf.name} already "
                              f"(quantize text_encoders only, or load an unquantized model)", param="quantize")
        if denoiser is None or (family is not None and family.file_format != "diffusers"):
            raise GenkitError(f"{gguf.name}: its base is not a diffusers pipeline with a transformer or UNet",
                              param="base")
    if (chosen or gguf) and family is not None and family.file_format != "diffusers":
        raise GenkitError(f"{family.title} models load from genkit's own format, which genkit does not quantize "
                          "(drop it)", param="quantize")
    for kind in sorted(set(chosen.values())):
        _check_kind(kind, device)
    return Plan(chosen, gguf, index)


def _check_kind(kind: str, device: str) -> None:
    if kind == "nf4":
        if not str(device).startswith("cuda"):
            raise GenkitError(f"nf4 is bitsandbytes' 4-bit format, whose kernels run on CUDA; on {device} use int8 or "
                              "fp8 (torchao, any device)", param="quantize")
        _require("bitsandbytes", "nf4")
    else:
        _require("torchao", kind)


def _require(package: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise GenkitError(f"{what} needs the {package} package, which is not installed (pip install "
                          f"\"genkit[quant]\")", param="quantize")


def _torchao_config(kind: str):
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # torchao's notes on its optional GPU kernels, at import
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    return {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[kind]()


def pipeline_config(parts: dict, index: dict, dtype):
    """diffusers' PipelineQuantizationConfig for {component: kind}: diffusers' or transformers' TorchAoConfig /
    BitsAndBytesConfig as the component's library is (model_index.json `index`)."""
    import diffusers
    import transformers
    from diffusers import PipelineQuantizationConfig

    mapping = {}
    for name, kind in parts.items():
        library = diffusers if index[name][0] == "diffusers" else transformers
        if kind == "nf4":
            mapping[name] = library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)
        else:
            mapping[name] = library.TorchAoConfig(_torchao_config(kind))
    return PipelineQuantizationConfig(quant_mapping=mapping)


def load(family, source: str, quantization: Plan, *, dtype, use_safetensors, local: bool):
    """The pipeline of folder (or hub id) `source` with `quantization` applied as it loads."""
    import warnings

    from diffusers import DiffusionPipeline

    extra, index = {}, quantization.index
    if quantization.parts:
        extra["quantization_config"] = pipeline_config(quantization.parts, index, dtype)
    denoiser = family.denoiser_name if family is not None else "transformer" if "transformer" in index else "unet"
    if quantization.gguf is not None:
        extra[denoiser] = load_gguf(quantization.gguf, index[denoiser], source, denoiser, dtype, local)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*only bfloat16 is supported.*")  # torchao runs fp32 too
        return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=use_safetensors,
                                                 local_files_only=local, **extra)


def load_gguf(path: Path, entry: list, base: str, subfolder: str, dtype, local: bool):
    """The denoiser of GGUF file `path`: class `entry` (its model_index.json entry) read with `from_single_file`, its
    configuration from `base`/`subfolder`, its quantized layers dequantized to `dtype` as they run."""
    import diffusers
    from diffusers import GGUFQuantizationConfig

    cls = getattr(diffusers, entry[1], None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise GenkitError(f"{path.name}: diffusers reads no single-file weights of {entry[1]}, the denoiser of "
                          f"{base}", param="model")
    try:
        model = cls.from_single_file(str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                     config=base, subfolder=subfolder, torch_dtype=dtype, local_files_only=local)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise GenkitError(f"{path.name}: diffusers could not map its tensors onto {entry[1]} of {base} "
                          f"({first_line(exc)}); the file must be that model's denoiser, in its original key names "
                          "(ComfyUI-GGUF's layout) or diffusers'", param="model") from None
    model._genkit_gguf = os.path.abspath(path)  # what `describe` records
    return model


def describe(pipe) -> dict:
    """{component: kind} of what a loaded pipeline holds quantized (empty: nothing), read off its modules."""
    found = {}
    for name, module in getattr(pipe, "components", {}).items():
        quantizer = getattr(module, "hf_quantizer", None)
        if quantizer is None:
            continue
        config = quantizer.quantization_config
        method = str(getattr(config.quant_method, "value", config.quant_method))
        if method == "gguf":
            found[name] = {"gguf": getattr(module, "_genkit_gguf", ""), "types": gguf_types(module)}
        elif method == "torchao":
            found[name] = {"Int8WeightOnlyConfig": "int8", "Float8WeightOnlyConfig": "fp8"}.get(
                type(config.quant_type).__name__, type(config.quant_type).__name__)
        elif method == "bitsandbytes":
            found[name] = "nf4" if getattr(config, "bnb_4bit_quant_type", None) == "nf4" else method
        else:
            found[name] = method
    return found


def gguf_types(module) -> list[str]:
    """The GGUF quantization types of a module's parameters (Q8_0, Q4_0, ...), sorted."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    return sorted({p.quant_type.name for p in module.parameters() if isinstance(p, GGUFParameter)})
