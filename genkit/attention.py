"""Attention backends by short name, each probed before a model uses it.

- `sdpa`: PyTorch's `scaled_dot_product_attention` (it picks its flash / memory-efficient / cuDNN / math kernel).
- `math`: the plain softmax(QK^T)V reference (SDPA's math kernel; diffusers' AttnProcessor on UNets).
- `sliced`: attention a slice of heads at a time; lowest peak memory, slower (UNet families).
- `xformers`: xformers' `memory_efficient_attention`: CUDA, fp16/bf16, and an xformers built for the installed torch.
- `flash`, `flash3`, `sage`: flash-attn 2, FlashAttention 3 (Hopper GPUs), SageAttention (int8 Q and K: close to,
  not equal to, exact attention), through diffusers' attention dispatcher: families whose model calls it (Flux, Chroma).
- `auto`: the best that runs: SDPA, unless another exact backend passed its probe and, on a GPU, was measured no
  slower on the model's shapes (`measure`); it says in one stderr line what it passed over and why.

A backend is never assumed to run: `probe` asks it once per (backend, route, device, dtype, head size) and the answer
is kept for the process. Rules first (`requirement`: the device, the package, the dtypes it takes, the GPU it needs),
then a tiny real call in the model's dtype and head size (`kernel_problem`), compared with the plain math. `decide`
turns the answers (and timings) into the choice, a pure function; `choose` asks them for a loaded model.

How a backend reaches a model is its family's business (`Family.apply_attention`, with `set_dispatch_backend` and
`swap_processors` below), and the choice belongs to that pipeline alone: nothing here changes process-wide state
(diffusers' dispatcher is told each processor's backend, never given a global one that the next model loaded in the
process would change).

(Over 500 lines on purpose: the rules, the probes, the decision and the two ways a backend reaches a model are one
invariant, "never run what has not answered a tiny real call on this model's shapes", read together.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from genkit.errors import GenkitError, term


class Attention(str, Enum):
    AUTO = "auto"
    XFORMERS = "xformers"
    SDPA = "sdpa"
    SLICED = "sliced"
    MATH = "math"
    FLASH = "flash"
    FLASH3 = "flash3"
    SAGE = "sage"


NAMES = tuple(a.value for a in Attention)
PROCESSORS, DISPATCHER = "processors", "dispatcher"  # a model's attention: diffusers' processors, or its dispatcher


@dataclass(frozen=True)
class Spec:
    """What a backend needs, how it is called, and what its probe forgives."""

    title: str  # its kernels, as messages name them
    routes: tuple[str, ...] = (PROCESSORS, DISPATCHER)  # how a model can reach it
    dispatch: str | None = None  # diffusers' dispatcher name (AttentionBackendName)
    cuda: bool = False  # needs a CUDA device
    half: bool = False  # takes fp16 / bf16 tensors only
    package: str | None = None  # the module that holds the kernels
    install: str = ""  # how to get a build that matches this torch
    hopper: bool = False  # Hopper GPUs (sm90) only
    exact: bool = True  # computes exact attention: auto may take it
    tolerance: float = 0.0  # the probe's largest difference from the plain math beyond rounding


SPECS = {
    Attention.SDPA: Spec("PyTorch SDPA", dispatch="native"),
    Attention.MATH: Spec("the math kernel", dispatch="_native_math"),
    Attention.SLICED: Spec("sliced attention", routes=(PROCESSORS,)),
    Attention.XFORMERS: Spec("xformers", dispatch="xformers", cuda=True, half=True, package="xformers",
                             install="pip install the xformers built for {torch}{index}"),
    Attention.FLASH: Spec("flash-attn", routes=(DISPATCHER,), dispatch="flash", cuda=True, half=True,
                          package="flash_attn",
                          install="pip install flash-attn built for {torch} (--no-build-isolation)"),
    Attention.FLASH3: Spec("FlashAttention 3", routes=(DISPATCHER,), dispatch="_flash_3", cuda=True, half=True,
                           package="flash_attn_interface", hopper=True,
                           install="build FlashAttention 3 for {torch} (flash-attention's hopper/ folder)"),
    Attention.SAGE: Spec("SageAttention", routes=(DISPATCHER,), dispatch="sage", cuda=True, half=True,
                         package="sageattention", exact=False, tolerance=0.1,
                         install="pip install sageattention built for {torch}"),
}
AUTO_ORDER = (Attention.SDPA, Attention.XFORMERS, Attention.FLASH3, Attention.FLASH)  # auto's candidates, SDPA first
PROBE_TOKENS, PROBE_HEADS = 8, 2  # a probe's call: (1, 8, 2, head size); 8 tokens keep xformers' mask alignment


def parse(name: str | Attention) -> Attention:
    try:
        return Attention(str(name.value if isinstance(name, Attention) else name).lower())
    except ValueError:
        raise GenkitError(f"{name!r} is not an attention backend genkit knows (valid: {', '.join(NAMES)})",
                          param="attention") from None


def _cuda(device) -> bool:
    return str(device).startswith("cuda")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- why a backend cannot run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Why a backend cannot run for a model. `kind`: "unfit" (the model cannot use it), "device", "absent" (not
    installed), "broken" (installed, does not load), "dtype", "hardware", "kernel" (its call failed or gave wrong
    values), "slower" (measured slower than what auto took) or "unmeasured" (auto takes it only where measured)."""

    kind: str
    text: str

    @property
    def said(self) -> bool:
        """Auto names it on stderr when passing it over: what a user can act on, not what is merely absent here."""
        return self.kind not in ("unfit", "device", "absent")


def requirement(backend: Attention, device: str, dtype, route: str | None = None) -> Problem | None:
    """Why `backend` cannot run on `device` in `dtype` whatever the model's shapes (None: its kernel is asked next).
    `route` None: the checks that hold for either route (before a model is loaded)."""
    spec = SPECS[backend]
    if route is not None and route not in spec.routes:
        where = "diffusers' attention dispatcher" if route == PROCESSORS else "diffusers' attention processors"
        return Problem("unfit", f"{backend.value} works through {where} only, and this model's attention does not")
    if spec.cuda and not _cuda(device):
        return Problem("device", f"{backend.value} needs a CUDA device, and this run is on {device}")
    if spec.package:
        problem = _package_problem(backend, route)
        if problem:
            return problem
    if spec.half and _dtype_name(dtype) not in ("float16", "bfloat16"):
        return Problem("dtype", f"{backend.value} takes fp16 or bf16 tensors, and this model computes in "
                                f"{_dtype_name(dtype)}")
    if spec.hopper:
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        if major != 9:
            return Problem("hardware", f"{spec.title} runs on Hopper GPUs (sm90), and this one is sm{major}{minor}")
    return None


def _package_problem(backend: Attention, route: str | None) -> Problem | None:
    spec = SPECS[backend]
    if importlib.util.find_spec(spec.package) is None:
        return Problem("absent", f"{spec.title} is not installed")
    try:
        importlib.import_module(spec.package + (".ops" if backend is Attention.XFORMERS else ""))
    except Exception as exc:  # a build for another torch or CUDA fails here
        return Problem("broken", f"{spec.title} is installed but does not load: {_said(exc)}")
    if route == DISPATCHER:
        from diffusers.models import attention_dispatch

        if backend is Attention.XFORMERS:
            if getattr(attention_dispatch, "xops", None) is None:
                wanted = getattr(attention_dispatch, "_REQUIRED_XFORMERS_VERSION", "its minimum")
                return Problem("broken", "diffusers' attention dispatcher did not load xformers (it takes "
                                         f"xformers>={wanted})")
        else:
            try:
                attention_dispatch._check_attention_backend_requirements(
                    attention_dispatch.AttentionBackendName(spec.dispatch))
            except RuntimeError as exc:
                return Problem("broken", _said(exc))
    if route == PROCESSORS and backend is Attention.XFORMERS:
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            return Problem("broken", "diffusers does not see xformers (its package metadata is missing)")
    return None


def _said(exc: BaseException, warned=()) -> str:
    """An exception in one line: its first line (xformers': up to "with inputs") and the first reasons it lists."""
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    head = lines[0].split(" with inputs")[0].rstrip(": ")
    reasons, under = [], False
    for line in lines[1:]:
        if line.rstrip().endswith("because:"):
            under = True
        elif under and line[:1].isspace() and line.strip():
            if line.strip() not in reasons:
                reasons.append(line.strip())
        else:
            under = False
    reasons += [str(w.message).splitlines()[0] for w in warned if issubclass(w.category, UserWarning)
                and str(w.message).strip()][:1]
    said = head + (f" ({'; '.join(reasons[:2])})" if reasons else "")
    return said if len(said) <= 300 else said[:297] + "..."


# -- the tiny real call ---------------------------------------------------------------------------------------------


def _inputs(tokens: int, heads: int, head_dim: int, seed: int = 0):
    """q, k, v: (1, tokens, heads, head_dim), float32 on the CPU, the same every time."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(1, tokens, heads, head_dim, generator=generator) for _ in range(3)]


def _mask(tokens: int, device=None):
    """A boolean (1, 1, q, k) mask, as Chroma's calls pass: every query attends to all keys but the last two."""
    import torch

    mask = torch.ones(1, 1, tokens, tokens, dtype=torch.bool, device=device)
    mask[..., tokens - 2:] = False
    return mask


def plain(q, k, v, mask=None):
    """The reference: softmax(QK^T / sqrt(d)) V in float32 on (batch, tokens, heads, head_dim) tensors."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def call(backend: Attention, q, k, v, *, route: str = PROCESSORS, mask=None):
    """One attention call of `backend` as the model's route makes it; q, k, v: (batch, tokens, heads, head_dim)."""
    import torch
    import torch.nn.functional as F

    if route == DISPATCHER:
        from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=AttentionBackendName(SPECS[backend].dispatch))
    if backend is Attention.XFORMERS:
        import xformers.ops

        return xformers.ops.memory_efficient_attention(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, tokens, head_dim)
    if backend is Attention.SLICED:  # what the sliced processor (and the UNets' math one) computes, per slice
        heads = q.shape[1]
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=q.shape[-1] ** -0.5)
        return torch.bmm(scores.softmax(-1), v).unflatten(0, (-1, heads)).transpose(1, 2)
    with _math_kernel() if backend is Attention.MATH else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def kernel_problem(backend: Attention, device: str, dtype, head_dim: int, route: str = PROCESSORS,
                   masked: bool = False) -> Problem | None:
    """Ask the kernel itself: one (1, 8, 2, head_dim) call in `dtype` on `device` (with a boolean mask where the
    model's calls pass one), compared with the plain math; no rules first, so a stand-in can be asked on any device."""
    import torch

    q, k, v = _inputs(PROBE_TOKENS, PROBE_HEADS, head_dim)
    mask = _mask(PROBE_TOKENS) if masked else None
    expected = plain(q, k, v, mask)
    title = SPECS[backend].title
    where = f"a tiny call ({_dtype_name(dtype)}, head size {head_dim}{', masked' if masked else ''})"
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                out = call(backend, *(t.to(device, dtype) for t in (q, k, v)), route=route,
                           mask=None if mask is None else mask.to(device)).float().cpu()  # .cpu(): waits for it
        except Exception as exc:
            return Problem("kernel", f"{title} failed on {where}: {_said(exc, warned)}")
    off = (out - expected).abs().max().item() if out.shape == expected.shape else float("inf")
    rounding = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 5e-3
    if not off <= rounding + SPECS[backend].tolerance:  # also NaN
        return Problem("kernel", f"{title} gave wrong values on {where}: {off:.2g} from the plain math")
    return None


@functools.lru_cache(maxsize=None)
def probe(backend: Attention, device: str, dtype, head_dim: int, route: str = PROCESSORS,
          masked: bool = False) -> Problem | None:
    """Why `backend` cannot take the model's calls of this head size in `dtype` on `device` (None: it ran and agreed
    with the plain math): the rules, then the tiny real call; asked once per process."""
    return requirement(backend, device, dtype, route) or kernel_problem(backend, device, dtype, head_dim, route, masked)


# -- what a model's attention calls look like ------------------------------------------------------------------------


class Shape(NamedTuple):
    """One kind of attention call a model makes: its dtype, heads and head size."""

    dtype: object
    heads: int
    head_dim: int


def shapes(models) -> tuple[Shape, ...]:
    """The distinct attention calls of `models` (torch modules): every diffusers attention layer's dtype, heads and
    head size (its query projection's width over its heads)."""
    found = set()
    for model in models:
        for module in model.modules():
            heads, to_q = getattr(module, "heads", None), getattr(module, "to_q", None)
            if not hasattr(module, "processor") or not isinstance(heads, int) or heads < 1 or to_q is None:
                continue
            weight = getattr(to_q, "weight", None)
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else \
                next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
            found.add(Shape(dtype, heads, to_q.out_features // heads))
    return tuple(sorted(found, key=lambda s: (str(s.dtype), s.heads, s.head_dim)))


def model_problem(backend: Attention, device: str, calls: tuple[Shape, ...], route: str,
                  masked: bool) -> Problem | None:
    """The first probe `backend` fails over a model's calls (None: it takes them all)."""
    for dtype, head_dim in dict.fromkeys((s.dtype, s.head_dim) for s in calls):
        problem = probe(backend, device, dtype, head_dim, route, masked)
        if problem:
            return problem
    return None


# -- timing ---------------------------------------------------------------------------------------------------------


def measure(backends, device: str, calls, tokens: int, route: str = PROCESSORS, masked: bool = False,
            repeats: int = 5) -> dict[Attention, float]:
    """Seconds one attention call of each backend takes at `tokens` tokens, summed over the model's `calls`
    (Shape: dtype, heads, head size): the best of `repeats` after a warm-up call, waited for on a GPU."""
    import torch

    def wait():
        if _cuda(device):
            torch.cuda.synchronize(device)

    seconds = {}
    with torch.no_grad():
        for backend in backends:
            total = 0.0
            for dtype, heads, head_dim in calls:
                q, k, v = (t.to(device, dtype) for t in _inputs(tokens, heads, head_dim))
                mask = _mask(tokens, device) if masked else None
                call(backend, q, k, v, route=route, mask=mask)
                best = float("inf")
                for _ in range(repeats):
                    wait()
                    start = time.perf_counter()
                    call(backend, q, k, v, route=route, mask=mask)
                    wait()
                    best = min(best, time.perf_counter() - start)
                total += best
            seconds[backend] = total
    return seconds


# -- the decision ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The backend that runs, and what auto passed over (backend, why)."""

    backend: Attention
    passed: tuple = ()

    @property
    def notice(self) -> str | None:
        """One line naming what auto passed over that a user can act on; None: nothing to say."""
        said = [(backend, problem) for backend, problem in self.passed if problem.said]
        if not said:
            return None
        return (f"attention auto: {self.backend.value}; passed over "
                + "; ".join(f"{backend.value} ({problem.text})" for backend, problem in said))


def decide(requested, problems: dict, device: str, timings: dict | None = None) -> Decision:
    """The backend `requested` stands for, from probe answers: `problems` maps the requested backend (or auto's
    candidates, and math as its last resort) to a Problem or None; `timings` (seconds, from `measure`) count on a GPU
    only. A pure function. Auto takes SDPA unless another exact backend ran its probe and was measured no slower;
    a backend asked for by name runs or is refused in one line (GenkitError about `attention`)."""
    requested = parse(requested)
    if requested is not Attention.AUTO:
        if problems.get(requested) is not None:
            raise GenkitError(refusal(requested, problems[requested]), param="attention")
        return Decision(requested)
    runs = [b for b in AUTO_ORDER if b in problems and problems[b] is None]
    base = Attention.SDPA if Attention.SDPA in runs else next(iter(runs), None)
    if base is None:
        if problems.get(Attention.MATH, "not probed") is not None:
            why = "; ".join(f"{backend.value}: {problem.text}" for backend, problem in problems.items() if problem)
            raise GenkitError(f"auto: no attention backend runs here ({why})", param="attention")
        base = Attention.MATH
    timed = _cuda(device) and timings is not None and base in timings
    chosen = base
    if timed:
        faster = [b for b in runs if b in timings and timings[b] <= timings[base]]
        chosen = min(faster, key=lambda b: (timings[b], b is not base))
    passed = []
    for backend in AUTO_ORDER:
        if backend not in problems or backend is chosen:
            continue
        problem = problems[backend]
        if problem is None and timed and backend in timings:
            problem = Problem("slower", f"measured {timings[backend] / timings[chosen]:.2f}x {chosen.value}'s time")
        elif problem is None:
            problem = Problem("unmeasured", f"it ran, and auto takes it over {base.value} only where measured no "
                                            "slower on a GPU")
        passed.append((backend, problem))
    return Decision(chosen, tuple(passed))


def torch_cuda() -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU build)."""
    import torch

    return torch.version.cuda


def _versions(backend: Attention) -> str:
    import torch

    spec = SPECS[backend]
    names = []
    if spec.package:
        names.append(f"{spec.title} {_package_version(spec.package) or 'not installed'}")
    cuda = f"CUDA {torch_cuda()}" if torch_cuda() else "no CUDA"
    return ", ".join(names + [f"torch {torch.__version__} ({cuda})"])


def _package_version(package: str) -> str | None:
    from importlib import metadata

    for name in (package, package.replace("_", "-")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    module = sys.modules.get(package)
    return getattr(module, "__version__", None)


def fix(backend: Attention, problem: Problem) -> str:
    """What to do about `problem`, in words for the user at hand (flags under the CLI)."""
    import torch

    sdpa = f"{term('attention')} sdpa"
    if problem.kind == "dtype":
        return f"load the model with {term('dtype')} bf16 or fp16, or use {sdpa}"
    if problem.kind == "hardware":
        return f"use {term('attention')} flash or sdpa"
    if problem.kind in ("absent", "broken", "kernel") and SPECS[backend].install and torch_cuda():
        index = f" (pip install -U {SPECS[backend].package} --index-url https://download.pytorch.org/whl/cu" \
                f"{torch_cuda().replace('.', '')})" if backend is Attention.XFORMERS else ""
        return SPECS[backend].install.format(torch=f"torch {torch.__version__}", index=index) + f", or use {sdpa}"
    if backend is Attention.SDPA:
        return f"use {term('attention')} math"
    return f"use {sdpa}"


def refusal(backend: Attention, problem: Problem) -> str:
    """The one line a backend asked for by name is refused with: what failed, the versions, the fix."""
    if problem.kind == "unfit":
        return f"{backend.value}: {problem.text}"
    return f"{backend.value}: {problem.text} [{_versions(backend)}]; {fix(backend, problem)}"


# -- for a loaded model ------------------------------------------------------------------------------------------------


def check(name, device: str, dtype, family=None) -> Attention:
    """`name` parsed, and refused before a slow load where it cannot run whatever the model: the family cannot use
    it, or the device, package or dtype rules say no. The kernel itself is asked once the model is loaded (`choose`)."""
    backend = parse(name)
    if backend is Attention.AUTO:
        return backend
    unfit = family.attention_unfit(backend) if family is not None else None
    problem = Problem("unfit", unfit) if unfit else requirement(backend, device, dtype)
    if problem:
        raise GenkitError(refusal(backend, problem), param="attention")
    return backend


def choose(name, family, pipe, device: str) -> Decision:
    """The backend `pipe` (of `family`) runs for `name`: each backend it may be is probed in the dtypes and head sizes
    of the layers it would reach; auto measures on a GPU when more than one runs, and says once on stderr what it
    passed over."""
    requested = parse(name)
    wanted = [requested] if requested is not Attention.AUTO else [*AUTO_ORDER, Attention.MATH]
    route = DISPATCHER if family.dispatcher else PROCESSORS
    problems, calls = {}, {}
    for backend in wanted:
        unfit = family.attention_unfit(backend)
        if unfit and requested is Attention.AUTO:
            continue
        calls[backend] = shapes(family.attention_modules(pipe, backend))
        problems[backend] = Problem("unfit", unfit) if unfit else \
            model_problem(backend, device, calls[backend], route, family.attention_masked)
    timings = None
    runs = [b for b in AUTO_ORDER if b in problems and problems[b] is None]
    if requested is Attention.AUTO and _cuda(device) and len(runs) > 1:  # timed on the calls they all take
        common = tuple(s for s in calls[runs[0]] if all(s in calls[b] for b in runs))
        key = (tuple(runs), device, common, _tokens(family, pipe), route, family.attention_masked)
        if key not in _TIMED:  # once per process: a model loaded again (a server's LoRA variant) decides the same
            _TIMED[key] = measure(*key)
        timings = _TIMED[key]
    decision = decide(requested, problems, device, timings)
    tell(decision.notice)
    return decision


def _tokens(family, pipe) -> int:
    """The longest attention sequence at the model's default size (latent pixels over patches), at most 4096."""
    try:
        side = family.default_size(pipe) // family.latent_multiple(pipe)
    except Exception:  # a model without those sizes: a typical sequence
        side = 32
    return max(64, min(4096, side * side))


_TOLD: set[str] = set()
_TIMED: dict[tuple, dict] = {}


def tell(notice: str | None) -> None:
    """Say `notice` on stderr in one line, once per process (a server that loads the model again says it once)."""
    if notice and notice not in _TOLD:
        _TOLD.add(notice)
        print(f"genkit: {notice}", file=sys.stderr)


# -- how a backend reaches a model's layers (for the families' apply_attention) -------------------------------------


def set_dispatch_backend(model, backend: Attention) -> None:
    """Give every dispatcher processor of `model` its own backend (diffusers' name for `backend`). Unlike diffusers'
    `set_attention_backend`, nothing process-wide changes: a processor left without one would follow the dispatcher's
    global backend, which the next model loaded with `set_attention_backend` sets for every model in the process."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = AttentionBackendName(SPECS[backend].dispatch)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = name


_XFORMERS_TWIN = {"AttnProcessor": "XFormersAttnProcessor", "AttnProcessor2_0": "XFormersAttnProcessor",
                  "JointAttnProcessor2_0": "XFormersJointAttnProcessor"}
_SDPA_TWIN = {"XFormersAttnProcessor": "AttnProcessor2_0", "XFormersJointAttnProcessor": "JointAttnProcessor2_0"}


def swap_processors(model, xformers: bool) -> None:
    """Swap each attention processor of `model` for diffusers' xformers twin (`xformers`), or back to its SDPA one;
    processors without a twin (SANA's linear attention, rotary ones) stay. diffusers' own switch,
    `enable_xformers_memory_efficient_attention`, first sends fp32 tensors to xformers, which takes fp16/bf16 only."""
    from diffusers.models import attention_processor

    twins = _XFORMERS_TWIN if xformers else _SDPA_TWIN
    for module in model.modules():
        processor = getattr(module, "processor", None)
        twin = twins.get(type(processor).__name__) if processor is not None else None
        if twin and hasattr(module, "set_processor"):
            module.set_processor(getattr(attention_processor, twin)())


# -- for `genkit info` ------------------------------------------------------------------------------------------------


def report(device: str, dtype=None, head_dim: int = 64) -> dict[str, str]:
    """Each backend and whether its probe ran on `device` (in `dtype`: fp16 on CUDA, else fp32), and why not."""
    import torch

    dtype = dtype or (torch.float16 if _cuda(device) else torch.float32)
    lines = {"probe": f"on {device}, {_dtype_name(dtype)}, {PROBE_HEADS} heads of {head_dim}, {PROBE_TOKENS} tokens"}
    answers = {}
    for backend in (Attention.SDPA, Attention.MATH, Attention.SLICED, Attention.XFORMERS, Attention.FLASH,
                    Attention.FLASH3, Attention.SAGE):
        said = {}
        for route in SPECS[backend].routes:
            problem = probe(backend, device, dtype, head_dim, route)
            answers.setdefault(backend, problem)
            said[route] = "ran" if problem is None else f"no: {problem.text}" + (
                f" [{_versions(backend)}; {fix(backend, problem)}]" if problem.kind != "device" else "")
        texts = list(dict.fromkeys(said.values()))
        lines[backend.value] = texts[0] if len(texts) == 1 else \
            f"{said[PROCESSORS]}; through diffusers' dispatcher: {said[DISPATCHER]}"
    lines["sdpa"] += f" (its kernels: {sdpa_kernels(device, dtype, head_dim)})"
    lines["auto"] = decide(Attention.AUTO, {b: answers[b] for b in AUTO_ORDER}, device).backend.value + \
        " (for a model: probed in its dtype and head sizes; on a GPU, measured where more than one runs)"
    return lines


def sdpa_kernels(device: str, dtype, head_dim: int) -> str:
    """Which of SDPA's kernels run a tiny call here (torch.nn.attention.sdpa_kernel), and why the others do not."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.to(device, dtype).transpose(1, 2) for t in _inputs(PROBE_TOKENS, PROBE_HEADS, head_dim))
    ran, not_ran = [], []
    for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                   SDPBackend.MATH):
        name = kernel.name.lower().removesuffix("_attention")
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            try:
                with torch.no_grad(), sdpa_kernel([kernel]):
                    F.scaled_dot_product_attention(q, k, v).cpu()
                ran.append(name)
            except Exception as exc:
                reasons = [str(w.message).splitlines()[0] for w in warned]
                why = reasons[0] if reasons else _said(exc) if _cuda(device) else "a CUDA kernel"
                not_ran.append(f"{name} ({why})")
    return ", ".join(ran) + " ran" + (f"; not {', '.join(not_ran)}" if not_ran else "")
