"""`genkit.load`: a preset name, a local diffusers folder or a hub id, ready to generate.

Resolution order: preset (`pipelines/*.toml`, then `$GENKIT_HOME/pipelines`), local folder
(must hold `model_index.json`), hub id (needs a network or a filled local cache).
Weights load from safetensors only; pickle files (`.bin`, `.ckpt`, `.pt`) can run code when
loaded, so they are refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from genkit import attention as attn
from genkit import presets
from genkit.errors import GenkitError, first_line, term

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def pick_device(device: str | None) -> str:
    import torch

    if device:
        return _check_device(device)
    if torch.cuda.is_available():
        return "cuda"
    if _mps():
        return "mps"
    return "cpu"


def _check_device(device: str) -> str:
    """`device` when torch can place tensors there on this machine, else a GenkitError naming what is."""
    import torch

    here = ", ".join(["cpu", *(["cuda"] if torch.cuda.is_available() else []), *(["mps"] if _mps() else [])])
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise GenkitError(f"{device}: not a device torch knows (available here: {here})", param="device") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise GenkitError(f"{device}: CUDA is not available here (available here: {here})", param="device")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise GenkitError(f"{device}: this machine has {count} CUDA device(s), numbered from 0 "
                              f"(try cuda:0)", param="device")
    elif parsed.type == "mps" and not _mps():
        raise GenkitError(f"{device}: Apple's MPS is not available here (available here: {here})", param="device")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise GenkitError(f"{device}: genkit runs on cpu, cuda or mps (available here: {here})", param="device")
    return device


def _mps() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch's name -> the families' (Family.dtypes)


def pick_dtype(dtype: str | None, device: str, family=None, bf16: bool | None = None):
    """`dtype` as torch's, refused in one line outside the family's `dtypes`. Unset: fp32 off CUDA; on CUDA the
    family's `gpu_dtype` for a GPU with or without bf16 (`bf16`; None: ask the device), and for a family not known
    until loaded (a hub id) bf16, else fp32: every family runs in both, and neither overflows."""
    import torch

    if dtype is None:
        if not str(device).startswith("cuda"):
            return torch.float32
        bf16 = gpu_bf16(device) if bf16 is None else bf16
        name = family.gpu_dtype(bf16) if family is not None else "bf16" if bf16 else "fp32"
        return getattr(torch, DTYPES[name])
    key = str(dtype).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise GenkitError(f"{dtype!r} is not a dtype genkit knows (valid: fp32, fp16, bf16)", param="dtype")
    check_dtype(family, DTYPES[key], dtype)
    return getattr(torch, DTYPES[key])


def check_dtype(family, name: str, given) -> None:
    """Refuse dtype `name` (torch's, as `given`) when `family` does not run in it (None: not known yet)."""
    short = SHORT[name]
    if family is None or short in family.dtypes:
        return
    why = " (fp16 overflows its activations into NaN: black images)" if short == "fp16" else ""
    raise GenkitError(f"{given}: {family.title} models run in {' or '.join(family.dtypes)}{why}; "
                      f"pass {term('dtype')} {family.dtypes[0]}", param="dtype")


def gpu_bf16(device: str) -> bool:
    """CUDA device `device` computes in bf16 natively (compute capability 8.0 and later; ROCm), not emulated."""
    import torch

    with torch.cuda.device(torch.device(device)):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def check_folder(folder: Path, allow_pickle: bool) -> dict:
    """Read `model_index.json` and refuse components whose weights exist only as pickles."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise GenkitError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder "
                          "(save one with pipe.save_pretrained(folder), or pass a preset name)")
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise GenkitError(f"{index} is not valid JSON ({first_line(exc)}); save the pipeline again with "
                          "pipe.save_pretrained(folder)") from None
    except OSError as exc:
        raise GenkitError(f"cannot read {index}: {exc.strerror or exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name", ""), str):
        raise GenkitError(f"{index} must be a JSON object with a \"_class_name\" string, like diffusers writes, got "
                          f"{type(config).__name__ if not isinstance(config, dict) else 'a non-string _class_name'} "
                          "(save the pipeline again with pipe.save_pretrained(folder))")
    for component in sorted(config):
        sub = folder / component
        if component.startswith("_") or not sub.is_dir():
            continue
        files = [p for p in sub.iterdir() if p.is_file()]
        pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix == ".safetensors" for p in files) and not allow_pickle:
            raise GenkitError(f"{sub} holds weights only in a pickle format ({pickles[0].name}), which can run code "
                              f"when loaded; convert them to safetensors, or pass {term('allow_pickle')} if you trust them")
    return config


@contextlib.contextmanager
def load_errors(source: str, local: bool):
    """The one place where loading a model's files fails: every library error becomes one GenkitError line.

    diffusers, transformers and safetensors raise OSError, ValueError, RuntimeError, KeyError, TypeError,
    json errors or safetensors' own SafetensorError for truncated weights, tensors of the wrong shape, corrupt
    config.json files or missing components; the user can only fix the folder (or pick another model).
    """
    from safetensors import SafetensorError

    try:
        yield
    except GenkitError:
        raise
    except MemoryError:
        raise GenkitError(f"not enough memory to load {source} (close other programs, or pick a smaller model "
                          f"or {term('dtype')} fp16/bf16)") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError,
            SafetensorError) as exc:
        if local:
            hint = "the folder's files are damaged or incomplete: download or save the model again"
            raise GenkitError(f"could not load folder {source}: {first_line(exc)} ({hint})") from None
        hint = "a hub id needs a network or a filled local cache; or pass a local folder"
        raise GenkitError(f"could not load hub id {source}: {first_line(exc)} ({hint})") from None


def _locate(name: str, allow_pickle: bool = False, base: str | None = None, models_dir=None):
    """(source, family or None, preset defaults, preset or None) of a preset name, local folder or hub id, or of a single
    file (genkit.single_file: a path, a preset whose source is one, a name in the models folder; `base`: its configs)."""
    from genkit import families, single_file

    found = single_file.locate(name, base=base, allow_pickle=allow_pickle, models_dir_given=models_dir)
    if found is not None:
        return found
    preset = presets.get(name)
    if preset is not None:
        source, family, defaults = preset.location(), preset.family, preset.defaults
    elif Path(name).expanduser().exists():
        source, family, defaults = str(Path(name).expanduser()), None, {}
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
        source, family, defaults = name, None, {}  # hub id: the family is known once loaded
    else:
        raise GenkitError(f"{name!r}: not a preset ({', '.join(presets.names())}) and no such folder "
                          "(pass a preset name, a diffusers folder, or a hub id like org/model)", param="model")
    if Path(source).exists():
        folder = Path(source)
        if not folder.is_dir():
            raise GenkitError(f"{folder} is a file; pass the pipeline folder that holds model_index.json", param="model")
        config = check_folder(folder, allow_pickle)
        family = family or families.detect(config.get("_class_name"), str(folder))
    return source, family, defaults, preset


def load_tokenizer(name_or_path: str | None = None):
    """(tokenizer, tokens it reads) of a model's main text conditioning, without loading any weights: what
    `genkit data check --model` counts captions with. A hub id's family is read from its model_index.json."""
    from genkit import families

    name = name_or_path or presets.DEFAULT_MODEL
    source, family, _, _ = _locate(name)
    local = Path(source).exists()
    with load_errors(source, local):
        if family is None:  # a hub id: its model_index.json says the family
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(source, "model_index.json")) as f:
                family = families.detect(json.load(f).get("_class_name"), source)
        tokenizer = family.tokenizer(getattr(source, "base", source))  # a single file's tokenizers are its base's
    limit = family.max_sequence_length or tokenizer.model_max_length
    return tokenizer, (limit if limit and limit < 100_000 else None)


def default_exact(device: str) -> bool:
    """--exact unless asked otherwise on a CPU, where it holds bitwise; --fast on GPUs (README: Seeds)."""
    return str(device).split(":")[0] == "cpu"  # "cpu:0" is what accelerate gives each process


def exact_refusal(device: str) -> str | None:
    """Why `exact=True` is refused on `device` (a GenkitError's message about `exact`), or None where it is offered.

    On CUDA the fixed blocks did not make batches bitwise equal to images alone (SD 1.5-size on an H200: batch 8
    against alone up to 2 levels apart) and ran at 0.32x a plain diffusers loop: a cost for a promise not kept."""
    if str(device).split(":")[0] != "cuda":
        return None
    fast = "--fast" if term("exact").startswith("--") else "exact=False"
    return ("is not offered on CUDA: there genkit keeps the same pixels for the same batch run to run (same prompts, "
            "seeds, batch size, settings, GPU and library versions), not pixels independent of the batch (cuBLAS and "
            "cuDNN choose kernels by a batch's shape: a level or two apart between a batch and alone); use "
            f"{fast}, the GPU default, or {term('device')} cpu where pixels never depend on the batch")


def check_exact(device: str, exact: bool) -> None:
    """Refuse `exact` where it is not offered (`exact_refusal`), in one line, before any model loads."""
    if exact and (why := exact_refusal(device)):
        raise GenkitError(why, param="exact")


def load(
    name_or_path: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    attention: str = "auto",
    allow_pickle: bool = False,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    cpu_offload: bool = False,
    memory=None,
    keep_freed_memory: bool = True,
    exact: bool | None = None,
    threads: int | str | None = None,
    lora=(),
    quantize=None,
    base: str | None = None,
    models_dir: str | None = None,
    controlnet=(),
):
    """Load a pipeline by preset name, local folder or hub id; returns a `genkit.Pipeline`.

    `lora`: LoRAs to apply, as `--lora` does: each a path (a LoRA folder or file), a "path:scale" string or a
    (path, scale) pair; a bad path, scale or file is refused before the model loads.

    `controlnet`: ControlNets to load with it (a folder or .safetensors file, or a list), each checked against the
    model; `generate(control=...)` loads any other a unit names when first asked (genkit.controlnet).

    `quantize`: weight-only quantization as the model loads, "int8" (the denoiser) or "denoiser=int8,text_encoders=fp8"
    (genkit.quantize); a `.gguf` file as `name_or_path` is a denoiser, its other components from the folder `base`.

    A single file (`name_or_path` a .safetensors checkpoint or transformer, or a name in the models folder `models_dir`
    or $GENKIT_MODELS_DIR) takes its configs from `base` (a diffusers folder or preset; unset: $GENKIT_BASE, a preset's
    base or the family's default preset): genkit.single_file.

    `exact` makes an image's pixels independent of its batch (genkit.invariance); False (`--fast`) skips
    that guard. Unset: exact on the CPU, where it holds bitwise and costs 0.79-0.9x on genkit-mini; fast on
    a GPU. On CUDA exact=True is refused (`exact_refusal`: it did not hold there, and undid what batching buys).
    `dtype` unset: the family's (`pick_dtype`); one it does not run in is refused, before the load where its family
    is known. On the CPU, `keep_freed_memory` keeps freed memory in the process (genkit.cpu: same pixels, faster
    sampling; the process keeps its peak memory until it exits). `threads` (or $GENKIT_THREADS): CPU threads, a
    number or "auto" (the cores free now); unset, --fast takes the free cores and --exact keeps torch's count and
    says on stderr when cores are busy (genkit.cpu.choose_threads).

    On CUDA a diffusers model is placed as its memory plan says (genkit.memory: the fastest placement that fits what
    is free on the device, or `memory`, like "12GiB", to plan for another card), said in one stderr line and recorded
    as `memory_plan`; `cpu_offload`, `vae_slicing` and `vae_tiling` override the plan. Elsewhere nothing is planned.
    """
    from genkit import families, single_file
    from genkit.generate import Pipeline

    base = base if base is not None else os.environ.get("GENKIT_BASE") or None  # what --base sets
    loras = lora_specs(lora, allow_pickle, models_dir)  # before the slow load
    from genkit import controlnet as controlnets

    control_paths = controlnets.check_paths(controlnet)  # found, before the slow load
    from genkit import quantize as quantized

    single = single_file.wanted(name_or_path, models_dir)  # a single-file checkpoint reads `base` itself
    name_or_path, gguf = quantized.gguf_source(name_or_path, None if single else base)  # a .gguf denoiser: the model is its base folder
    budget = None if memory is None else memory if isinstance(memory, int) else _parse_memory(memory)
    name = name_or_path or presets.DEFAULT_MODEL
    source, family, defaults, preset = _locate(name, allow_pickle, base if single else None, models_dir)
    local = Path(source).exists()
    backend_device = pick_device(device)
    exact = default_exact(backend_device) if exact is None else exact
    check_exact(backend_device, exact)
    torch_dtype = pick_dtype(dtype, backend_device, family)
    backend = attn.check(attention, backend_device, torch_dtype, family)  # what cannot run, before the slow load
    if backend_device == "cpu":
        from genkit import cpu

        advice = cpu.choose_threads(threads, exact=exact).advice  # before the load: measured while this idles
        if advice:
            print(f"genkit: {advice}", file=sys.stderr)
    use_safetensors = None if allow_pickle else True
    with load_errors(source, local):
        quantization = quantized.plan(quantize, family, source, local, backend_device, gguf)  # before the slow load
        if quantization:
            pipe = quantized.load(family, source, quantization, dtype=torch_dtype, use_safetensors=use_safetensors,
                                  local=local)
        elif isinstance(source, single_file.SingleFile):
            pipe = single_file.load(source, dtype=torch_dtype, use_safetensors=use_safetensors)
        elif family is not None:
            pipe = family.load(source, dtype=torch_dtype, use_safetensors=use_safetensors, local=local)
        else:  # a hub id: the family is known once loaded
            from genkit.families.base import load_diffusers

            pipe = load_diffusers(source, torch_dtype, use_safetensors, local)
    if family is None:  # a hub id: its family and the dtypes it runs in are known now
        family = families.detect(type(pipe).__name__, source)
        if dtype is not None:
            check_dtype(family, str(torch_dtype).removeprefix("torch."), dtype)
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload and not backend_device.startswith("cuda"):
        raise GenkitError("moves models between CPU and GPU and needs CUDA (drop it on CPU)", param="cpu_offload")
    described = quantized.describe(pipe) if quantization else {}
    step, meta = _place(pipe, name, family, backend_device, torch_dtype, budget, cpu_offload, vae_slicing, vae_tiling,
                        allow_pickle, _planned_formats(described))
    if keep_freed_memory and backend_device == "cpu":
        from genkit import cpu

        cpu.keep_freed_memory()
    vae = getattr(pipe, "vae", None)
    if (vae_slicing or vae_tiling) and vae is None:
        raise GenkitError(f"{name} decodes pixels directly and has no VAE; drop {term('vae_slicing')}/{term('vae_tiling')}")
    if vae_slicing:
        vae.enable_slicing()
    if vae_tiling:
        vae.enable_tiling()
    pipeline = Pipeline(pipe, name=name if preset is not None else source, family=family, defaults=defaults,
                        device=backend_device, attention=backend, exact=exact)
    pipeline.quantization = described
    pipeline.memory_step, pipeline.memory_model, pipeline.memory_budget = step, meta, budget
    if loras:
        from genkit import lora as adapters

        adapters.apply(pipeline, loras, allow_pickle=allow_pickle)
    controlnets.preload(pipeline, control_paths)
    return pipeline


def _parse_memory(memory) -> int:
    from genkit.memory import parse_bytes

    return parse_bytes(memory)


def _planned_formats(described: dict) -> dict:
    """{component: genkit.memory format} of what genkit.quantize loaded (a GGUF denoiser by its first block type:
    Q8_0 is 8.5 bits a weight, Q4_0 and Q4_K 4.5), for the memory plan."""
    formats = {}
    for component, kind in described.items():
        if isinstance(kind, dict):
            types = [t.lower() for t in kind.get("types", ())]
            kind = "q8_0" if "q8_0" in types else "q4_k" if any(t.startswith("q4") for t in types) else None
        if kind:
            formats[component] = kind
    return formats


def _place(pipe, name: str, family, device: str, torch_dtype, budget, cpu_offload, vae_slicing, vae_tiling,
           allow_pickle, formats=None):
    """Place the loaded pipe: on CUDA as its memory plan says (genkit.memory.apply), the flags overriding the plan's
    placement (`cpu_offload`) and VAE mode (slicing, tiling: applied after, as before); elsewhere on `device`.
    Returns (the step that runs, the planner's meta model or None)."""
    from genkit import memory

    if not device.startswith("cuda") or family.file_format != "diffusers":
        if cpu_offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        return memory.Step("model-offload" if cpu_offload else "device", by="flags" if cpu_offload else "plan"), None
    try:
        meta = memory.meta_model(name, allow_pickle=allow_pickle)
        plan = memory.plan(meta, device=device, memory=budget, dtype=SHORT[str(torch_dtype).removeprefix("torch.")],
                           quantize=formats or None)
    except GenkitError as exc:
        if budget is not None:
            raise
        print(f"genkit: no memory plan ({exc.naming(exc.param)}); everything on {device}", file=sys.stderr)
        pipe.to(device)
        return memory.Step("gpu"), None
    step = memory.step_of(plan)
    flags = cpu_offload or vae_slicing or vae_tiling
    if flags:
        step = memory.Step("model-offload" if cpu_offload else step.placement,
                           "tiled" if vae_tiling else "sliced" if vae_slicing else "whole", by="flags")
    memory.apply(pipe, step if not flags else memory.Step(step.placement), device)
    verdict = "fits" if plan.fits else "does not fit even so"
    print(f"genkit: memory plan: {memory.step_of(plan).label()}, {memory.gib(plan.predicted_peak_bytes)} predicted of "
          f"{memory.gib(plan.budget_bytes)} ({plan.budget_from}): {verdict}"
          + (f"; running {step.label()}" if flags else ""), file=sys.stderr)
    return step, meta


def lora_specs(given, allow_pickle: bool = False, models_dir=None) -> list:
    """`genkit.load`'s `lora` as genkit.lora.LoraSpec's, each file found and its header read: one path, "path:scale"
    string, (path, scale) pair or LoraSpec, or a list of them."""
    from genkit import lora

    if isinstance(given, (str, os.PathLike, lora.LoraSpec)) or _is_pair(given):
        given = [given]
    if given is None:
        given = []
    specs = []
    for entry in given:
        if isinstance(entry, os.PathLike):  # a path is a path, even with a ':' in it
            spec = lora.parse_spec(lora.LoraSpec(Path(entry).expanduser()))
        elif _is_pair(entry):
            spec = lora.parse_spec(lora.LoraSpec(Path(entry[0]).expanduser(), float(entry[1])))
        elif isinstance(entry, (str, lora.LoraSpec)):
            spec = lora.parse_spec(entry)
        else:
            raise GenkitError(f"{entry!r:.60}: a LoRA is a path, a \"path:scale\" string or a (path, scale) pair",
                              param="lora")
        from genkit.single_file import named_lora

        spec = lora.LoraSpec(named_lora(spec.path, models_dir), spec.scale)  # or a name in the models folder's LoRAs
        file = lora.weights_file(spec.path, allow_pickle)
        if file.suffix == ".safetensors":
            lora.check_safetensors(file)
        specs.append(spec)
    return specs


def _is_pair(entry) -> bool:
    """(path, scale): a tuple or list of a path and a number."""
    return isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], (str, os.PathLike)) and \
        isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)

