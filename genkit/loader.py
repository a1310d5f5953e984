"""`genkit.load`: a preset name, a local diffusers folder or a hub id, ready to generate.

Resolution order: preset (`pipelines/*.toml`, then `$GENKIT_HOME/pipelines`), local folder
(must hold `model_index.json`), hub id (needs a network or a filled local cache).
Weights load from safetensors only; pickle files (`.bin`, `.ckpt`, `.pt`) can run code when
loaded, so they are refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import contextlib
import json
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


def pick_dtype(dtype: str | None, device: str, family=None):
    """`dtype` as torch's; unset: fp16 for latent models on CUDA (a family not known yet counts as latent), else fp32."""
    import torch

    if dtype is None:
        latent = family.latent if family is not None else True
        return torch.float16 if device.startswith("cuda") and latent else torch.float32
    key = str(dtype).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise GenkitError(f"{dtype!r} is not a dtype genkit knows (valid: fp32, fp16, bf16)", param="dtype")
    return getattr(torch, DTYPES[key])


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


def _locate(name: str, allow_pickle: bool = False):
    """(source, family or None, preset defaults, preset or None) of a preset name, local folder or hub id."""
    from genkit import families

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
        tokenizer = family.tokenizer(source)
    limit = family.max_sequence_length or tokenizer.model_max_length
    return tokenizer, (limit if limit and limit < 100_000 else None)


def default_exact(device: str) -> bool:
    """--exact unless asked otherwise on a CPU, where it holds bitwise; --fast on GPUs (README: Seeds)."""
    return str(device).split(":")[0] == "cpu"  # "cpu:0" is what accelerate gives each process


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
    keep_freed_memory: bool = True,
    exact: bool | None = None,
    threads: int | str | None = None,
):
    """Load a pipeline by preset name, local folder or hub id; returns a `genkit.Pipeline`.

    `exact` makes an image's pixels independent of its batch (genkit.invariance); False (`--fast`) skips
    that guard. Unset: exact on the CPU, where it holds bitwise and costs 0.79-0.9x on genkit-mini; fast on
    a GPU, where it is not guaranteed (cuBLAS/cuDNN) and would undo what batching buys (README: Seeds). On the CPU, `keep_freed_memory` keeps freed memory in the process (genkit.cpu: same pixels, faster
    sampling; the process keeps its peak memory until it exits). `threads` (or $GENKIT_THREADS): CPU threads, a
    number or "auto" (the cores free now); unset, --fast takes the free cores and --exact keeps torch's count and
    says on stderr when cores are busy (genkit.cpu.choose_threads).
    """
    from genkit import families
    from genkit.generate import Pipeline

    name = name_or_path or presets.DEFAULT_MODEL
    source, family, defaults, preset = _locate(name, allow_pickle)
    local = Path(source).exists()
    backend_device = pick_device(device)
    exact = default_exact(backend_device) if exact is None else exact
    backend = attn.resolve(attention, backend_device)  # fail on xformers before the slow load
    torch_dtype = pick_dtype(dtype, backend_device, family)
    if backend_device == "cpu":
        from genkit import cpu

        advice = cpu.choose_threads(threads, exact=exact).advice  # before the load: measured while this idles
        if advice:
            print(f"genkit: {advice}", file=sys.stderr)
    use_safetensors = None if allow_pickle else True
    with load_errors(source, local):
        if family is not None:
            pipe = family.load(source, dtype=torch_dtype, use_safetensors=use_safetensors, local=local)
        else:  # a hub id: the family is known once loaded
            from genkit.families.base import load_diffusers

            pipe = load_diffusers(source, torch_dtype, use_safetensors, local)
    family = family or families.detect(type(pipe).__name__, source)
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload:
        if not backend_device.startswith("cuda"):
            raise GenkitError("moves models between CPU and GPU and needs CUDA (drop it on CPU)", param="cpu_offload")
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(backend_device)
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
    return Pipeline(pipe, name=name if preset is not None else source, family=family, defaults=defaults,
                    device=backend_device, attention=backend, exact=exact)

