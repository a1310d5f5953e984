"""LoRA files: what one holds (`genkit lora inspect`) and kohya's layout for other tools (`genkit lora export`).

(Over 500 lines on purpose: inspect and export read the same three key layouts with the same parsers, and export
checks its file by reading it back through them.)

Three key layouts are in use (see genkit.lora for loading them): diffusers' (`unet.<layer>.lora.down.weight`, what
genkit's trainer writes for UNet families), peft's (`transformer.<layer>.lora_A.weight`, diffusers' transformer
scripts) and kohya's (`lora_unet_<layer with _>.lora_down.weight` + `.alpha`, with the training settings as `ss_*`
fields in the safetensors header), which AUTOMATIC1111 and ComfyUI load.

`inspect` reads the header and the tensors' shapes, genkit's record beside the weights (`genkit_lora.json`) or
the one an export stored in the header, and kohya's `ss_*` fields; with a model it counts the layers that fit it
with the same check `--lora` makes (genkit.lora.check_fit).

`export_kohya` writes a UNet family's adapter (sd, sdxl, genkit-mini) in kohya's layout. The names are the UNet's
diffusers module paths with `_` for `.`, which is what kohya's own SD 1.x/2.x files hold, what ComfyUI maps for
every UNet (`lora_unet_<diffusers path>`, comfy/lora.py) and what A1111 converts (convert_diffusers_name_to_compvis).
Every tensor is copied unchanged and each layer's `.alpha` is the alpha the diffusers loader would have used, so the
update alpha/rank * up @ down is the same; before writing, the file is read back through diffusers' kohya converter
and must give back every layer, tensor and alpha (a layer whose name would not survive is refused by name).

Transformer families whose original model's names are known (`Kohya.layer`: Flux.1, Chroma, Flux.2, Qwen-Image and
its editing models, Z-Image) export onto those names: kohya's `lora_unet_<original, _ for .>` and ComfyUI's
`diffusion_model.<original>` (`--format comfyui`). Where the original fuses layers diffusers keeps apart (Flux's q, k
and v in one `img_attn.qkv`; a single block's q, k, v and MLP input in one `linear1`), the pair is the exact fusion of
the parts: the downs stacked, the ups block-diagonal (a missing part zero), so up @ down holds each part's update in
its rows and diffusers' converter splits it back part by part (its check for a block-diagonal up). Every layer's
alpha/rank is multiplied into its up matrix and `.alpha` is the rank (diffusers' Flux reader ignores the final
layer's alpha; Flux.2's ai-toolkit reader takes none). Before writing, the file is read back through the family's
diffusers loader (`Kohya.reader`) and every layer's update up @ down must come back (fused parts a layer no part
filled read back as zero). DoRA's magnitudes and LoKr/LoHa factors have no place in these layouts: refused in a line.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from genkit.errors import GenkitError, first_line, term
from genkit.lora import WEIGHTS_NAME, is_lycoris, peft_names

RECORD_NAME = "genkit_lora.json"  # what genkit.train.lora writes beside the weights
RECORD_FIELD = "genkit_lora"  # the header field an export stores the record in
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
_CONTAINERS = re.compile(r"(blocks|attentions|resnets|layers|downsamplers|upsamplers)$")
_TRAINING_SS = ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_train_steps", "ss_steps",
                "ss_num_epochs", "ss_epoch", "ss_batch_size_per_device", "ss_total_batch_size",
                "ss_gradient_accumulation_steps", "ss_num_train_images", "ss_num_reg_images", "ss_resolution",
                "ss_seed", "ss_optimizer", "ss_lr_scheduler", "ss_lr_warmup_steps", "ss_mixed_precision",
                "ss_noise_offset", "ss_clip_skip", "ss_network_module", "ss_network_args", "ss_training_comment",
                "ss_output_name", "ss_training_started_at", "ss_training_finished_at")


def _fail(path, why: str) -> GenkitError:
    return GenkitError(f"{path}: {why}")


# --- Reading a file ----------------------------------------------------------------------------


@dataclass
class LoraFile:
    """One LoRA weights file: its tensors, header fields and the genkit record that describes it, if any."""

    path: Path  # the .safetensors file
    tensors: dict
    header: dict
    record: dict | None
    record_source: str | None  # the record file, or "header" for one an export stored


def open_lora(path: str | Path) -> LoraFile:
    """Read a LoRA folder or .safetensors file; anything else is one GenkitError line."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        files = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise _fail(path, "no .safetensors file in the folder (a LoRA folder holds "
                              f"{WEIGHTS_NAME} or one .safetensors file)")
        if len(files) > 1:
            raise _fail(path, f"{len(files)} .safetensors files in the folder; name the one to read")
        file = files[0]
    elif path.is_file():
        file = path
        if file.suffix != ".safetensors":
            raise _fail(path, "not a .safetensors file (genkit reads LoRAs in safetensors only; pickles can run code)")
    else:
        raise _fail(path, "no such file or folder")
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _fail(file, f"not a valid safetensors file ({first_line(exc)}); is it truncated, or another "
                          "format renamed?") from None
    record, source = None, None
    beside = file.parent / RECORD_NAME
    if file.name == WEIGHTS_NAME and beside.is_file():
        try:
            record, source = json.loads(beside.read_text()), str(beside)
        except (OSError, ValueError) as exc:
            raise _fail(beside, f"the genkit record is not readable JSON ({first_line(exc)})") from None
    elif RECORD_FIELD in header:
        try:
            record, source = json.loads(header[RECORD_FIELD]), "header"
        except ValueError:
            pass
    lora = LoraFile(file, tensors, header, record, source)
    if not any(_is_lora_key(k) for k in tensors):
        raise _fail(file, f"holds no LoRA weights ({len(tensors)} tensors, none named lora_A/lora_B, "
                          "lora.down/lora.up or lora_down/lora_up)")
    return lora


def _is_lora_key(key: str) -> bool:
    return bool(re.search(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.down|"
                          r"lora_linear_layer\.up)(\.[\w]+)?\.weight$", key)) or is_lycoris({key: None})


def key_format(tensors: dict) -> str:
    """kohya, diffusers or peft (or "diffusers+peft" for a file that mixes the two)."""
    keys = [k for k in tensors if _is_lora_key(k)]
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if is_lycoris(tensors):
        return "peft-loha" if any(".hada_" in k for k in keys) else "peft-lokr"
    peft = any(re.search(r"\.lora_[AB](\.[\w]+)?\.weight$", k) for k in keys)
    diffusers = any(re.search(r"[._]lora(_linear_layer)?\.(down|up)\.weight$", k) for k in keys)
    return "diffusers+peft" if peft and diffusers else "peft" if peft else "diffusers"


def diffusers_state(lora: LoraFile) -> tuple[dict, dict]:
    """(state dict with component prefixes, network alphas) as diffusers reads the file; kohya keys converted."""
    tensors = lora.tensors
    if key_format(tensors) != "kohya":
        alphas = _alpha_layers({k: float(v) for k, v in tensors.items() if k.endswith(".alpha")})
        return {k: v for k, v in tensors.items() if not k.endswith(".alpha")}, alphas
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    try:
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise _fail(lora.path, f"kohya keys diffusers cannot convert ({first_line(exc)})") from None
    return state, _alpha_layers(alphas or {})


def _alpha_layers(alphas: dict) -> dict[str, float]:
    """diffusers' converter names an alpha by the layer's old diffusers key (`...attn1.processor.to_q_lora.down.weight
    .alpha`, `...ff.net.2.alpha`): {`<component>.<layer>` in peft's names: alpha}. A component's keys are converted
    together, as diffusers tells their layout from all of them (`to_out_lora` marks the old text-encoder names)."""
    probes: dict[str, dict] = {}
    for key, value in alphas.items():
        base = key.removesuffix(".alpha")
        component = next((c for c in COMPONENTS if base.startswith(f"{c}.")), None)
        if component is not None:
            base = base.removeprefix(f"{component}.")
            probe = base if base.endswith(".weight") else f"{base}.lora.down.weight"
            probes.setdefault(component, {})[probe] = float(value)
    named = {}
    for component, part in probes.items():
        for key, value in peft_names(component, part).items():
            named[f"{component}.{re.sub(r'[.]lora_A([.][a-z_]+)?[.]weight$', '', key)}"] = value
    return named


def split_layers(state: dict) -> dict[str, dict]:
    """{component: {layer (peft name): {"A": tensor, "B": tensor}}} of a state dict in diffusers or peft layout."""
    parts: dict[str, dict] = {}
    for key, value in state.items():
        component = next((c for c in COMPONENTS if key.startswith(f"{c}.")), "other")
        name = key if component == "other" else key.removeprefix(f"{component}.")
        parts.setdefault(component, {})[name] = value
    layers: dict[str, dict] = {}
    for component, part in parts.items():
        for key, value in peft_names(component, part).items():
            match = re.match(r"^(.*)\.lora_([AB])(\.[\w]+)?\.weight$", key)
            if match:
                layers.setdefault(component, {}).setdefault(match.group(1), {})[match.group(2)] = value
    return layers


def lycoris_layers(state: dict) -> dict[str, dict]:
    """{component: {layer: {factor: tensor}}} of peft's LoKr or LoHa factors (`lokr_w1`, `hada_w1_a`, ...)."""
    from genkit.lora import _LYCORIS

    layers: dict[str, dict] = {}
    for key, value in state.items():
        component = next((c for c in COMPONENTS if key.startswith(f"{c}.")), "other")
        if match := _LYCORIS.match(key.removeprefix(f"{component}.")):
            layers.setdefault(component, {}).setdefault(match.group(1), {})[match.group(2)] = value
    return layers


def layer_kind(layer: str) -> str:
    """What a layer is, without where: the path after its last numbered block (`attn1.to_q`, `conv1`, `ff.net.2`)."""
    parts = layer.split(".")
    cut = 0
    for i in range(1, len(parts)):
        if parts[i].isdigit() and _CONTAINERS.search(parts[i - 1]) and i + 1 < len(parts):
            cut = i + 1
    return ".".join(parts[cut:])


def adapter_config(header: dict, component: str) -> dict:
    """The peft LoraConfig diffusers stored for `component` (`lora_adapter_metadata`: flat `<component>.<key>`)."""
    try:
        saved = json.loads(header.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    return {k.removeprefix(f"{component}."): v for k, v in saved.items() if k.startswith(f"{component}.")}


def layer_alpha(config: dict, layer: str, alphas: dict, component: str) -> float | None:
    """The alpha a loader uses for one layer: a stored `.alpha`, else peft's config (patterns first), else None."""
    stored = alphas.get(f"{component}.{layer}", alphas.get(layer))
    if stored is not None:
        return stored
    if "lora_alpha" not in config:
        return None
    alpha = float(config["lora_alpha"])
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(pattern.keys(), layer)
        alpha = float(pattern.get(key, alpha))
    return alpha


# --- Inspect -----------------------------------------------------------------------------------


@dataclass
class LoraInfo:
    path: Path
    format: str
    size: int  # bytes
    tensors: int
    components: dict[str, int]  # component -> layers
    ranks: dict[int, int]  # rank -> layers
    alphas: dict[str, int]  # alpha (as text) -> layers; "not stored" when the loader falls back to alpha = rank
    targets: dict[str, dict[str, int]]  # component -> layer kind -> count
    base_model: str | None = None
    family: str | None = None
    trigger_words: list[str] = field(default_factory=list)
    training: dict = field(default_factory=dict)
    record: str | None = None
    model: str | None = None  # --model, when given
    matched: int | None = None
    wanted: int | None = None
    miss: str | None = None

    def as_dict(self) -> dict:
        data = dict(self.__dict__)
        data["path"] = str(self.path)
        data["ranks"] = {str(k): v for k, v in self.ranks.items()}
        return data


def inspect_lora(path: str | Path, model: str | None = None) -> LoraInfo:
    """What a LoRA file holds; with `model` (a preset, folder or hub id) how many of its layers fit that model."""
    lora = open_lora(path)
    fmt = key_format(lora.tensors)
    state, alphas = diffusers_state(lora)
    layers = lycoris_layers(state) if is_lycoris(state) else split_layers(state)
    ranks: Counter = Counter()
    alpha_count: Counter = Counter()
    targets: dict[str, Counter] = {}
    for component, named in layers.items():
        config = adapter_config(lora.header, component)
        for name, pair in named.items():
            rank = int(pair["A"].shape[0]) if "A" in pair else int(config.get("r", 0))  # LoKr/LoHa: peft's r
            ranks[rank] += 1
            alpha = layer_alpha(config, name, alphas, component) if "A" in pair else config.get("alpha")
            alpha_count["not stored (alpha = rank)" if alpha is None else f"{alpha:g}"] += 1
            targets.setdefault(component, Counter())[layer_kind(name)] += 1
    info = LoraInfo(path=lora.path, format=fmt, size=lora.path.stat().st_size, tensors=len(lora.tensors),
                    components={c: len(n) for c, n in layers.items()}, ranks=dict(sorted(ranks.items())),
                    alphas=dict(alpha_count.most_common()),
                    targets={c: dict(sorted(t.items())) for c, t in targets.items()}, record=lora.record_source)
    _describe(info, lora)
    if model is not None:
        _fit(info, lora, model)
    return info


def _describe(info: LoraInfo, lora: LoraFile) -> None:
    """Base model, trigger words and training settings: genkit's record first, then kohya's ss_* fields."""
    header, record = lora.header, lora.record
    if record:
        recipe = record.get("recipe") or {}
        train, data, adapter = recipe.get("train", {}), recipe.get("data", {}), recipe.get("lora", {})
        info.base_model, info.family = record.get("base_model"), record.get("family")
        info.trigger_words = list(record.get("trigger_words") or [])
        if record.get("instance_prompt"):
            info.trigger_words.append(record["instance_prompt"])
        wanted = {"steps": record.get("steps"), "learning_rate": train.get("learning_rate"),
                  "lr_scheduler": train.get("lr_scheduler"), "batch_size": train.get("batch_size"),
                  "effective_batch_size": record.get("effective_batch_size"), "resolution": data.get("resolution"),
                  "rank": adapter.get("rank"), "alpha": adapter.get("alpha"),
                  "target_modules": adapter.get("target_modules"), "text_encoder": adapter.get("text_encoder"),
                  "seed": train.get("seed"), "mixed_precision": train.get("mixed_precision"),
                  "images": record.get("images"), "items": record.get("items"), "data_dir": record.get("data_dir"),
                  "dataset": record.get("dataset"), "genkit": (record.get("versions") or {}).get("genkit")}
        prior = record.get("prior") or {}
        if prior.get("images"):
            wanted["prior"] = f"{prior['images']} {prior['source']} images, {prior['fraction']:.0%} of every batch"
        info.training = {k: v for k, v in wanted.items() if v not in (None, "", [])}
        return
    info.base_model = header.get("ss_sd_model_name") or header.get("modelspec.architecture")
    info.family = header.get("ss_base_model_version")
    info.training = {k.removeprefix("ss_"): header[k] for k in _TRAINING_SS if header.get(k) not in (None, "", "None")}
    info.trigger_words = kohya_triggers(header)


def kohya_triggers(header: dict) -> list[str]:
    """Trigger words of a kohya file: its dataset folders' names (`<repeats>_<words>`), else its most frequent tags."""
    words: list[str] = []
    for field_name in ("ss_dataset_dirs", "ss_tag_frequency"):
        try:
            folders = json.loads(header.get(field_name) or "{}")
        except ValueError:
            continue
        if not isinstance(folders, dict):
            continue
        for name, value in folders.items():
            match = re.match(r"^\d+_(.+)$", str(name))
            if match and match.group(1) not in words:
                words.append(match.group(1))
            elif field_name == "ss_tag_frequency" and isinstance(value, dict) and not words:
                ranked = sorted(value.items(), key=lambda item: (-_number(item[1]), item[0]))
                words.extend(tag for tag, _ in ranked[:5] if tag not in words)
    return words


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _fit(info: LoraInfo, lora: LoraFile, model: str) -> None:
    import genkit
    from genkit import lora as lora_module

    pipeline = genkit.load(model, device="cpu")
    state, _, _ = lora_module.read(lora.path, pipeline.pipe, pipeline.family)
    fit = lora_module.check_fit(state, pipeline.pipe, pipeline.family)
    info.model, info.matched, info.wanted, info.miss = pipeline.name, fit.matched, fit.wanted, fit.miss


def format_info(info: LoraInfo) -> str:
    """The report `genkit lora inspect` prints."""
    kib = info.size / 1024
    lines = [("file", f"{info.path} ({kib:,.1f} KiB, {info.tensors} tensors)"),
             ("format", {"kohya": "kohya (lora_unet_... lora_down/lora_up/alpha)",
                         "diffusers": "diffusers (<component>.<layer>.lora.down/up)",
                         "peft": "peft (<component>.<layer>.lora_A/lora_B)",
                         "peft-lokr": "peft LoKr (<component>.<layer>.lokr_w1/lokr_w2...)",
                         "peft-loha": "peft LoHa (<component>.<layer>.hada_w1_a/...)"}.get(info.format, info.format)),
             ("layers", ", ".join(f"{c} {n}" for c, n in info.components.items())),
             ("rank", ", ".join(f"{r} ({n} layers)" if len(info.ranks) > 1 else str(r) for r, n in info.ranks.items())),
             ("alpha", ", ".join(f"{a} ({n} layers)" if len(info.alphas) > 1 else a for a, n in info.alphas.items()))]
    for component, kinds in info.targets.items():
        lines.append((f"targets {component}", ", ".join(f"{kind} x{n}" for kind, n in kinds.items())))
    lines.append(("base model", f"{info.base_model or 'not recorded'}" + (f" ({info.family})" if info.family else "")))
    lines.append(("trigger words", ", ".join(info.trigger_words) or "none recorded"))
    source = {"header": "genkit record in the file's header"}.get(info.record, info.record) if info.record else \
        ("kohya ss_* fields" if info.training else None)
    lines.append(("training", (", ".join(f"{k}={_short(v)}" for k, v in info.training.items()) + f" [{source}]")
                  if info.training else "no record (no genkit_lora.json beside it, no ss_* fields)"))
    if info.model is not None:
        verdict = "fits" if info.matched == info.wanted else f"does not fit; first that did not: {info.miss}"
        lines.append(("model", f"{info.model}: {info.matched} of {info.wanted} layers match ({verdict})"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(textwrap.fill(v, 118, initial_indent=f"{k:<{width}}  ", subsequent_indent=" " * (width + 2),
                                   break_on_hyphens=False, break_long_words=False)
                     if k.startswith(("targets", "training")) else f"{k:<{width}}  {v}" for k, v in lines)


def _short(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- Export to kohya ---------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path
    layers: int
    rank: int
    alpha: float
    base_version: str
    sha256: str  # sshs_model_hash: sha256 of the tensor data (kohya's and A1111's LoRA hash)


def _family_of(lora: LoraFile, layers: dict, model: str | None) -> tuple[object, object]:
    """(family or None, loaded pipeline or None): --model, else the record, else the components the keys name."""
    from genkit import families

    if model is not None:
        import genkit

        pipeline = genkit.load(model, device="cpu")
        return pipeline.family, pipeline
    if lora.record and lora.record.get("family") in families.names():
        return families.get(lora.record["family"]), None
    return families.for_lora_components(set(layers)), None


def export_kohya(src: str | Path, out: str | Path, *, model: str | None = None, overwrite: bool = False,
                 layout: str = "kohya") -> ExportResult:
    """Write the LoRA at `src` (a genkit/diffusers/peft folder or file) as one .safetensors file at `out` in kohya's
    layout (`layout="kohya"`: lora_unet_..., what kohya's sd-scripts, A1111/Forge and ComfyUI read) or ComfyUI's
    (`"comfyui"`: diffusion_model.<original layer>, transformer families)."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise _fail(out, f"the {layout} file's name must end in .safetensors")
    if out.exists() and not overwrite:
        raise _fail(out, f"already exists (pass {term('overwrite')} to replace it)")
    lora = open_lora(src)
    if key_format(lora.tensors) == "kohya":
        raise _fail(lora.path, "is already in kohya's layout")
    if is_lycoris(lora.tensors):
        kind = "LoHa" if key_format(lora.tensors) == "peft-loha" else "LoKr"
        raise _fail(lora.path, f"holds a {kind} adapter (peft's factors); kohya's and ComfyUI's LoRA layouts hold "
                               "down/up pairs only, so it is not exported (it loads as it is in genkit; train with "
                               "lora.adapter=lora to export)")
    state, stored_alphas = diffusers_state(lora)
    layers = split_layers(state)
    family, pipeline = _family_of(lora, layers, model)
    _check_exportable(lora, layers, family, layout)
    if pipeline is not None:
        from genkit import lora as lora_module

        fit = lora_module.check_fit(state, pipeline.pipe, pipeline.family)
        if fit.matched < fit.wanted:
            raise _fail(lora.path, f"does not fit {pipeline.name}: {fit.matched} of its {fit.wanted} layers matched "
                                   f"(first that did not: {fit.miss})")
    for component in layers:
        if adapter_config(lora.header, component).get("use_dora"):
            raise _fail(lora.path, f"{component} is a DoRA adapter; kohya's and ComfyUI's LoRA layouts have no "
                                   "magnitude vectors, so it is not exported (train with lora.dora=false to export)")
    if family.kohya.layer is not None:
        kohya, deltas = _original_layers(lora, family, layers, stored_alphas, layout)
        _check_updates(lora.path, family, kohya, deltas)
        ranks = Counter(int(v.shape[0]) for k, v in kohya.items() if k.endswith(f".{_pair_names(family, layout)[0]}"
                                                                                 ".weight"))
        alphas = Counter(float(rank) for rank in ranks.elements())  # alpha / rank multiplied into the ups
        count, base_version = sum(ranks.values()), family.kohya.version(None)
    else:
        kohya, expected = _unet_layers(lora, family, layers, stored_alphas)
        _check_read_back(lora.path, kohya, expected)
        ranks = Counter(int(a.shape[0]) for a, _, _ in expected.values())
        alphas = Counter(alpha for _, _, alpha in expected.values())
        count, base_version = len(expected), _base_version(family, expected, pipeline)
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    metadata = _kohya_metadata(lora, out, family, base_version, rank, alpha, ranks, alphas)
    digest = data_hash(kohya)
    metadata["sshs_model_hash"] = digest
    _write(out, kohya, metadata)
    return ExportResult(out, count, rank, alpha, base_version, digest)


def _check_exportable(lora: LoraFile, layers: dict, family, layout: str) -> None:
    """One line where the family, its components or the layout cannot be exported."""
    from genkit import families

    if family is None or family.kohya is None or set(layers) - set(family.kohya.prefixes):
        what = ", ".join(sorted(layers))
        exportable = ", ".join(f.name for f in families.all_families() if f.kohya is not None)
        known = "not known: pass --model, or keep genkit_lora.json beside the weights" if family is None else \
            family.name
        raise _fail(lora.path, f"holds {what} adapters (model family: {known}); kohya export covers the families "
                               f"whose layer names kohya and ComfyUI are known to use ({exportable})")
    if layout not in family.kohya.layouts:
        raise _fail(lora.path, f"is a {family.title} LoRA, which exports to {' and '.join(family.kohya.layouts)}, not "
                               f"{layout}")


def _unet_layers(lora: LoraFile, family, layers: dict, stored_alphas: dict) -> tuple[dict, dict]:
    """kohya tensors of a UNet family's LoRA (diffusers' paths, `_` for `.`, tensors unchanged, alpha per layer) and
    {(component, layer): (down, up, alpha)} to check them against."""
    import torch

    kohya, expected = {}, {}
    for component, named in layers.items():
        config = adapter_config(lora.header, component)
        prefix = family.kohya.prefixes[component]
        for name, pair in sorted(named.items()):
            if set(pair) != {"A", "B"}:
                raise _fail(lora.path, f"layer {component}.{name} has only lora_{''.join(pair)}")
            rank = int(pair["A"].shape[0])
            alpha = _alpha(config, name, stored_alphas, component, rank)
            key = prefix + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = pair["A"].contiguous()
            kohya[f"{key}.lora_up.weight"] = pair["B"].contiguous()
            kohya[f"{key}.alpha"] = torch.tensor(alpha, dtype=pair["A"].dtype)
            expected[(component, name)] = (pair["A"], pair["B"], alpha)
    return kohya, expected


def _alpha(config: dict, name: str, stored: dict, component: str, rank: int) -> float:
    """The alpha that scales a layer's update by alpha / rank as the diffusers loader applies it."""
    alpha = layer_alpha(config, name, stored, component)
    alpha = float(rank) if alpha is None else alpha  # diffusers' loader: no alpha stored means alpha = rank
    if config.get("use_rslora"):  # peft scales by alpha / sqrt(r), kohya by alpha / r
        alpha *= math.sqrt(rank)
    return alpha


def _pair_names(family, layout: str) -> tuple[str, str]:
    return ("lora_down", "lora_up") if layout == "kohya" else tuple(family.kohya.comfyui_keys)


def _original_layers(lora: LoraFile, family, layers: dict, stored_alphas: dict, layout: str) -> tuple[dict, dict]:
    """A transformer LoRA on its original model's layers (`Kohya.layer`): each layer's alpha / rank multiplied into
    its up; fused layers as the stacked downs and the block-diagonal ups of their parts (a missing part zero, a
    smaller rank padded with zeros). Returns the tensors and {layer: (down, scaled up)} to check them against."""
    import torch

    component = family.denoiser_name
    named, config = layers[component], adapter_config(lora.header, component)
    originals, scaled, updates = {}, {}, {}
    for name, pair in sorted(named.items()):
        found = family.kohya.layer(name)
        if found is None:
            raise _fail(lora.path, f"layer {component}.{name} has no counterpart in {family.title}'s original model "
                                   "as kohya's and ComfyUI's files name it; not exported")
        if set(pair) != {"A", "B"}:
            raise _fail(lora.path, f"layer {component}.{name} has only lora_{''.join(pair)}")
        originals[found.original] = found
        scale = _alpha(config, name, stored_alphas, component, int(pair["A"].shape[0])) / pair["A"].shape[0]
        scaled[name] = (pair["A"], pair["B"] * scale if scale != 1 else pair["B"])
        updates[name] = scaled[name]
    down_name, up_name = _pair_names(family, layout)
    prefix = family.kohya.prefixes[component] if layout == "kohya" else "diffusion_model."
    tensors = {}
    for original, spec in sorted(originals.items()):
        down, up = _fused(spec, scaled) if len(spec.parts) > 1 else scaled[spec.parts[0]]
        if spec.swap:  # the original's (shift, scale) rows are diffusers' (scale, shift): its reader swaps them back
            up = torch.cat(up.chunk(2)[::-1])
        key = prefix + (original.replace(".", "_") if layout == "kohya" else original)
        tensors[f"{key}.{down_name}.weight"] = down.contiguous()
        tensors[f"{key}.{up_name}.weight"] = up.contiguous()
        if layout == "kohya" or family.kohya.comfyui_alphas:
            tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)  # scale 1: baked in
    return tensors, updates


def _fused(spec, scaled: dict) -> tuple:
    """(down, up) of one fused original layer: its parts' downs stacked, their ups block-diagonal, so up @ down is
    each part's update in its rows; parts not adapted are zero, parts of smaller rank padded with zeros."""
    import torch

    present = [name for name in spec.parts if name in scaled]
    rank = max(int(scaled[name][0].shape[0]) for name in present)
    first = scaled[present[0]]
    width_in, dtype = int(first[0].shape[1]), first[0].dtype
    unit = first[1].shape[0] / spec.widths[spec.parts.index(present[0])]  # output rows per width ratio
    downs, ups = [], []
    for name, ratio in zip(spec.parts, spec.widths):
        down, up = scaled.get(name, (torch.zeros(0, width_in, dtype=dtype), torch.zeros(round(unit * ratio), 0,
                                                                                          dtype=dtype)))
        downs.append(torch.cat([down, torch.zeros(rank - down.shape[0], width_in, dtype=dtype)]))
        ups.append(torch.cat([up, torch.zeros(up.shape[0], rank - up.shape[1], dtype=dtype)], dim=1))
    return torch.cat(downs), torch.block_diag(*ups)


def _probed(down, up):
    """up @ down applied to a fixed random probe (in float64): equal maps give equal probes, and it costs rank x
    width where the update itself would cost width x width (Flux's linear1: 21,504 x 3,072)."""
    import torch

    probe = torch.randn(down.shape[1], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return up.double() @ (down.double() @ probe)


def _check_updates(path: Path, family, tensors: dict, updates: dict) -> None:
    """Read the file back through the family's diffusers loader: every layer's update up @ down must come back (a
    fused layer's parts that were not adapted as zero), compared on a random probe of its inputs."""
    import diffusers.loaders
    import torch

    reader = getattr(diffusers.loaders, family.kohya.reader)
    try:
        read = reader.lora_state_dict(dict(tensors))
    except (ValueError, KeyError, RuntimeError, TypeError, AssertionError, IndexError) as exc:
        why = first_line(exc) or type(exc).__name__
        raise _fail(path, f"diffusers' {family.kohya.reader} cannot read the file back ({why}); not exported") from None
    read = read[0] if isinstance(read, tuple) else read
    pairs: dict[str, dict] = {}
    for key, value in read.items():
        # (diffusers' Flux converter names the top-level layers, img_in ... final_layer, without the prefix)
        if match := re.match(r"^(?:transformer\.)?(.*)\.lora_([AB])\.weight$", key):
            pairs.setdefault(match.group(1), {})[match.group(2)] = value
    for name, (down, up) in updates.items():
        pair = pairs.pop(name, None)
        if pair is None or set(pair) != {"A", "B"}:
            raise _fail(path, f"layer transformer.{name} would not be read back by diffusers' {family.kohya.reader}; "
                              "not exported")
        back, update = _probed(pair["A"], pair["B"]), _probed(down, up)
        if back.shape != update.shape or pair["A"].shape[1] != down.shape[1] or \
                not torch.allclose(back, update, rtol=1e-5, atol=1e-7 * update.abs().max()):
            raise _fail(path, f"layer transformer.{name}: diffusers' {family.kohya.reader} reads back another update")
    extra = next((name for name, pair in pairs.items() if _probed(pair["A"], pair["B"]).abs().max() > 0), None)
    if extra is not None:
        raise _fail(path, f"diffusers' {family.kohya.reader} reads back a layer that was not written: {extra}")


def _check_read_back(path: Path, kohya: dict, expected: dict) -> None:
    """Read the kohya tensors back through diffusers' converter: every layer, tensor and alpha must come back."""
    import torch

    lora = LoraFile(path, dict(kohya), {}, None, None)
    state, alphas = diffusers_state(lora)
    back = split_layers(state)
    got = {(c, name): pair for c, named in back.items() for name, pair in named.items()}
    for (component, name), (down, up, alpha) in expected.items():
        pair = got.pop((component, name), None)
        if pair is None:
            raise _fail(path, f"layer {component}.{name} would not be read back under its name from kohya's layout "
                              "by diffusers' converter; not exported")
        if not (torch.equal(pair["A"], down) and torch.equal(pair["B"], up)):
            raise _fail(path, f"layer {component}.{name}: diffusers' converter reads back other tensors")
        if alphas.get(f"{component}.{name}") != alpha:
            raise _fail(path, f"layer {component}.{name}: its alpha {alpha:g} is read back as "
                              f"{alphas.get(f'{component}.{name}')}")
    if got:
        raise _fail(path, f"diffusers' converter reads back a layer that was not written: {sorted(got)[0]}")


def _base_version(family, expected: dict, pipeline) -> str:
    """kohya's ss_base_model_version; SD 2.x told from its 1024-wide text context when the LoRA or model shows it."""
    if pipeline is not None:
        width = getattr(family.denoiser(pipeline.pipe).config, "cross_attention_dim", None)
    else:
        widths = {int(a.shape[1]) for (c, name), (a, _, _) in expected.items()
                  if c == family.denoiser_name and re.search(r"attn2\.to_[kv]$", name)}
        width = widths.pop() if len(widths) == 1 else None
    return family.kohya.version(width)


def _kohya_metadata(lora: LoraFile, out: Path, family, base_version: str, rank: int, alpha: float,
                    ranks: Counter, alphas: Counter) -> dict[str, str]:
    from genkit import __version__

    record = lora.record or {}
    recipe = record.get("recipe") or {}
    train, data = recipe.get("train", {}), recipe.get("data", {})
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": base_version,
        "ss_v2": str(base_version == "sd_v2"),
        "ss_output_name": out.stem,
        "ss_training_comment": f"trained with genkit (genkit train lora), exported to kohya's layout by genkit "
                               f"{__version__} (genkit lora export) from {lora.path.name}; the genkit record is "
                               f"in the {RECORD_FIELD} field",
    }
    if len(ranks) > 1 or len(alphas) > 1:  # per layer in the tensors; the fields above hold the most common
        metadata["ss_network_args"] = json.dumps({"ranks": {str(k): v for k, v in ranks.items()},
                                                  "alphas": {f"{k:g}": v for k, v in alphas.items()}})
    if record:
        triggers = list(record.get("trigger_words") or []) + ([record["instance_prompt"]]
                                                             if record.get("instance_prompt") else [])
        folder = Path(record.get("data_dir") or "dataset").name
        settings = {"ss_sd_model_name": record.get("base_model"), "ss_max_train_steps": record.get("steps"),
                    "ss_steps": record.get("steps"), "ss_learning_rate": train.get("learning_rate"),
                    "ss_unet_lr": train.get("learning_rate"), "ss_lr_scheduler": train.get("lr_scheduler"),
                    "ss_lr_warmup_steps": train.get("warmup_steps"), "ss_seed": train.get("seed"),
                    "ss_batch_size_per_device": train.get("batch_size"),
                    "ss_gradient_accumulation_steps": train.get("gradient_accumulation_steps"),
                    "ss_total_batch_size": record.get("effective_batch_size"),
                    "ss_mixed_precision": train.get("mixed_precision"), "ss_num_train_images": record.get("images"),
                    "ss_resolution": f"({data['resolution']}, {data['resolution']})" if data.get("resolution")
                    else None,
                    "ss_optimizer": "torch.optim.AdamW"}
        metadata.update({k: str(v) for k, v in settings.items() if v is not None})
        if triggers:  # genkit keeps no per-caption tag counts: each trigger word is listed once
            metadata["ss_tag_frequency"] = json.dumps({folder: {word: 1 for word in triggers}})
        metadata[RECORD_FIELD] = json.dumps(record)
    return metadata


def data_hash(tensors: dict) -> str:
    """sha256 of a safetensors file's data section (not its header): kohya's `sshs_model_hash`, which A1111 shows."""
    from safetensors.torch import save

    raw = save(tensors)
    size = int.from_bytes(raw[:8], "little")
    return hashlib.sha256(io.BytesIO(raw[8 + size:]).getvalue()).hexdigest()


def _write(out: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    from genkit.outputs import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: save_file(tensors, str(path), metadata=metadata))
