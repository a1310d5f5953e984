"""Attention that is probed, not assumed (#26).

A GPU run with the PyPI xformers wheel built for another CUDA: `import xformers` worked, its kernels did not ("No
operator found for `memory_efficient_attention_forward` ... xFormers wasn't built with CUDA support"), `auto` chose it
because it imported, and every run ended in a traceback; a Flux pipeline loaded with `sdpa` failed once another had
set diffusers' process-wide dispatcher backend. Here: stand-in `xformers` packages (one whose kernel raises that very
message, one that computes attention) on `sys.path` of a subprocess, so they never reach other tests; the probe asked
on the CPU, the rules and the decision for a simulated CUDA device (a pure function of probe answers and timings); and
several tiny pipelines in one process, each keeping its own backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import genkit
from genkit import attention
from genkit.attention import DISPATCHER, Attention, Problem, Shape
from genkit.cli import main
from genkit.errors import GenkitError
from genkit.testing import DEFAULT_ARCH, build_tiny

REPO = Path(__file__).resolve().parents[1]
XFORMERS_MESSAGE = ("No operator found for `memory_efficient_attention_forward` with inputs:\n{shapes}"
                    "     attn_bias   : {bias}\n     p           : {p}\n"
                    "`fa3F@0.0.0` is not supported because:\n    xFormers wasn't built with CUDA support\n"
                    "    requires device with capability == (9, 0) but your GPU has capability (0, 0) (too old)\n"
                    "`fa2F@2.5.7-pt` is not supported because:\n    xFormers wasn't built with CUDA support\n"
                    "`cutlassF-pt` is not supported because:\n    xFormers wasn't built with CUDA support")
BROKEN = f'''
calls = 0


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
    """What the PyPI wheel built for another CUDA does: it imports, and its kernels are not there."""
    global calls
    calls += 1
    shapes = "".join(f"     {{name:<12}}: shape={{tuple(t.shape)}} ({{t.dtype}})\\n"
                     for name, t in (("query", query), ("key", key), ("value", value)))
    raise NotImplementedError({XFORMERS_MESSAGE!r}.format(shapes=shapes, bias=type(attn_bias), p=p))
'''
WORKING = '''
import torch

calls = 0


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
    """softmax(QK^T * scale + attn_bias) V, on (batch, tokens, heads, head size) or (batch, tokens, head size)."""
    global calls
    calls += 1
    flat = query.dim() == 3
    q, k, v = ((t.unsqueeze(2) if flat else t).transpose(1, 2).float() for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_bias is not None:
        scores = scores + (attn_bias.unsqueeze(1) if flat else attn_bias).float()
    out = (scores.softmax(-1) @ v).transpose(1, 2).to(query.dtype)
    return out.squeeze(2) if flat else out
'''


def stand_in(folder: Path, ops: str) -> Path:
    """An importable `xformers` 0.0.35 (with package metadata, so diffusers sees it too) whose ops are `ops`."""
    (folder / "xformers").mkdir(parents=True)
    (folder / "xformers" / "__init__.py").write_text('__version__ = "0.0.35"\n')
    (folder / "xformers" / "ops.py").write_text(ops)
    (folder / "xformers-0.0.35.dist-info").mkdir()
    (folder / "xformers-0.0.35.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: xformers\n"
                                                                   "Version: 0.0.35\n")
    return folder


def with_stand_in(folder: Path, code: str) -> dict:
    """Run `code` in a fresh Python with the stand-in first on its path; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_tiny("flux", tmp_path_factory.mktemp("models") / "flux")


@pytest.fixture(scope="module")
def tiny_chroma(tmp_path_factory):
    return build_tiny("chroma", tmp_path_factory.mktemp("models") / "chroma")


# -- the probe, asked on the CPU, with a stand-in xformers ------------------------------------------------------------


def test_an_xformers_whose_kernel_raises_is_probed_refused_and_passed_over(tmp_path, tiny_flux):
    folder = stand_in(tmp_path / "broken", BROKEN)
    got = with_stand_in(folder, f"""
        import json, torch
        import xformers.ops as stand_in
        from click.testing import CliRunner
        import genkit
        from genkit import attention as A
        from genkit.attention import Attention, DISPATCHER, PROCESSORS
        from genkit.cli import main
        from genkit.errors import GenkitError

        out = {{}}
        problem = A.kernel_problem(Attention.XFORMERS, "cpu", torch.bfloat16, 40)  # the stand-in asked directly
        out["kernel"] = [problem.kind, problem.text, stand_in.calls]
        through = A.kernel_problem(Attention.XFORMERS, "cpu", torch.float16, 40, DISPATCHER)
        out["dispatcher"] = [through.kind, through.text, stand_in.calls]
        # the rules on a simulated CUDA device: installed and loadable, so the dtype decides before any call
        rule = lambda dtype, route: getattr(A.requirement(Attention.XFORMERS, "cuda", dtype, route), "text", None)
        out["rules"] = {{f"{{dtype}} {{route}}": rule(dtype, route) for dtype in (torch.float32, torch.float16,
                        torch.bfloat16) for route in (PROCESSORS, DISPATCHER)}}
        A.torch_cuda = lambda: "12.8"  # a CUDA build of torch, as on the GPU that showed it
        try:
            A.decide("xformers", {{Attention.XFORMERS: problem}}, "cuda:0")
        except GenkitError as error:
            out["refused"] = [str(error), error.param]
        decision = A.decide("auto", {{Attention.SDPA: None, Attention.XFORMERS: problem}}, "cuda:0")
        out["auto"] = [decision.backend.value, decision.notice]
        out["calls_before_load"] = stand_in.calls

        # the issue's leak: a pipeline set to xformers through diffusers' own call (as genkit did) sets the
        # dispatcher's process-wide backend; a processor that follows it now reaches the broken kernel
        flux = genkit.load({str(tiny_flux)!r}, device="cpu")  # auto: sdpa on a CPU
        out["flux"] = flux.attention.value
        def latents(pipeline):
            with pipeline.family.attention_context(pipeline.attention):
                return pipeline.pipe(prompt=["a red circle"], num_inference_steps=2, width=32, height=32,
                                     generator=torch.Generator().manual_seed(0), output_type="latent").images
        before = latents(flux)
        from diffusers import DiffusionPipeline
        other = DiffusionPipeline.from_pretrained({str(tiny_flux)!r})
        other.transformer.set_attention_backend("xformers")
        plain = DiffusionPipeline.from_pretrained({str(tiny_flux)!r})  # its processors follow the global backend
        try:
            plain(prompt=["a red circle"], num_inference_steps=1, width=32, height=32)
            out["plain"] = "ran"
        except NotImplementedError as error:
            out["plain"] = str(error).splitlines()[0]
        calls = stand_in.calls
        out["flux_after"] = [bool(torch.equal(before, latents(flux))), stand_in.calls - calls]

        result = CliRunner().invoke(main, ["generate", "a", "--model", {str(tiny_flux)!r}, "--attention", "xformers",
                                           "--device", "cpu", "--out", "never"])
        out["cli"] = [result.exit_code, result.stderr]
        print(json.dumps(out))
    """)
    kind, text, calls = got["kernel"]
    assert kind == "kernel" and calls == 1 and "\n" not in text
    assert "No operator found for `memory_efficient_attention_forward`" in text and "with inputs" not in text
    assert "xFormers wasn't built with CUDA support" in text and "bfloat16, head size 40" in text
    assert got["dispatcher"][0] == "kernel" and got["dispatcher"][2] == 2  # diffusers' dispatcher reached it too
    assert got["rules"] == {
        "torch.float32 processors": "xformers takes fp16 or bf16 tensors, and this model computes in float32",
        "torch.float32 dispatcher": "xformers takes fp16 or bf16 tensors, and this model computes in float32",
        "torch.float16 processors": None, "torch.float16 dispatcher": None,
        "torch.bfloat16 processors": None, "torch.bfloat16 dispatcher": None}
    message, param = got["refused"]
    assert param == "attention" and "\n" not in message
    for needle in ("No operator found", "xformers 0.0.35", f"torch {torch.__version__} (CUDA 12.8)",
                   "pip install the xformers built for torch", "--index-url https://download.pytorch.org/whl/cu128",
                   "or use attention sdpa"):
        assert needle in message, (needle, message)
    backend, notice = got["auto"]
    assert backend == "sdpa" and "\n" not in notice
    assert notice.startswith("attention auto: sdpa; passed over xformers (") and "No operator found" in notice
    assert got["calls_before_load"] == 2  # the decisions asked nothing more
    assert got["flux"] == "sdpa" and got["plain"].startswith("No operator found")
    assert got["flux_after"] == [True, 0]  # genkit's pipeline kept its own backend and never reached the stand-in
    exit_code, stderr = got["cli"]
    lines = stderr.strip().splitlines()
    assert exit_code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("Error: --attention xformers: xformers needs a CUDA device, and this run is on cpu")
    assert "xformers 0.0.35" in lines[0] and f"torch {torch.__version__}" in lines[0] and "--attention sdpa" in lines[0]


def test_an_xformers_that_runs_passes_its_probe_and_auto_takes_it_only_when_measured_no_slower(tmp_path):
    folder = stand_in(tmp_path / "working", WORKING)
    got = with_stand_in(folder, """
        import json, torch
        import xformers.ops as stand_in
        from genkit import attention as A
        from genkit.attention import Attention, DISPATCHER, Shape

        out = {}
        out["probe"] = [A.kernel_problem(Attention.XFORMERS, "cpu", dtype, 40)
                        for dtype in (torch.bfloat16, torch.float16)]
        out["dispatcher"] = A.kernel_problem(Attention.XFORMERS, "cpu", torch.bfloat16, 16, DISPATCHER)
        # Chroma's calls pass a boolean mask: diffusers 0.42's xformers dispatch adds it as +1/0 (type_as), so the
        # masked keys are not masked; the probe compares with the plain math and says so; SDPA takes the mask right
        masked = A.kernel_problem(Attention.XFORMERS, "cpu", torch.bfloat16, 16, DISPATCHER, masked=True)
        out["masked"] = [masked.kind, masked.text]
        out["sdpa_masked"] = A.kernel_problem(Attention.SDPA, "cpu", torch.bfloat16, 16, DISPATCHER, masked=True)
        out["calls"] = stand_in.calls
        seconds = A.measure([Attention.SDPA, Attention.XFORMERS], "cpu", (Shape(torch.bfloat16, 2, 16),), tokens=64)
        out["measured"] = {b.value: s for b, s in seconds.items()}
        runs = {Attention.SDPA: None,
                Attention.XFORMERS: A.kernel_problem(Attention.XFORMERS, "cpu", torch.bfloat16, 40)}
        def pick(device, timings):
            decision = A.decide("auto", runs, device, timings)
            return [decision.backend.value, decision.notice]
        out["faster"] = pick("cuda", {Attention.SDPA: 2.0, Attention.XFORMERS: 1.0})
        out["as_fast"] = pick("cuda", {Attention.SDPA: 1.0, Attention.XFORMERS: 1.0})
        out["slower"] = pick("cuda", {Attention.SDPA: 1.0, Attention.XFORMERS: 1.25})
        out["unmeasured"] = pick("cuda", None)
        out["cpu_timed"] = pick("cpu", {Attention.SDPA: 2.0, Attention.XFORMERS: 1.0})  # timings count on a GPU only
        out["named"] = A.decide("xformers", runs, "cuda").backend.value
        print(json.dumps(out, default=str))
    """)
    assert got["probe"] == [None, None] and got["dispatcher"] is None and got["sdpa_masked"] is None
    kind, text = got["masked"]
    assert kind == "kernel" and "gave wrong values" in text and "masked" in text
    assert got["calls"] == 4  # each probe asked the stand-in itself
    assert set(got["measured"]) == {"sdpa", "xformers"} and all(s > 0 for s in got["measured"].values())
    assert got["faster"] == ["xformers", "attention auto: xformers; passed over sdpa (measured 2.00x xformers's time)"]
    assert got["as_fast"][0] == "sdpa"  # a tie keeps the default
    assert got["slower"] == ["sdpa", "attention auto: sdpa; passed over xformers (measured 1.25x sdpa's time)"]
    assert got["unmeasured"][0] == "sdpa" and "only where measured no slower on a GPU" in got["unmeasured"][1]
    assert got["cpu_timed"][0] == "sdpa" and got["named"] == "xformers"


# -- the decision, a pure function of probe answers, for a simulated CUDA device -------------------------------------


def test_auto_passes_over_what_cannot_run_and_says_why_in_one_line():
    half_only = Problem("dtype", "xformers takes fp16 or bf16 tensors, and this model computes in float32")
    absent = Problem("absent", "flash-attn is not installed")
    decision = attention.decide("auto", {Attention.SDPA: None, Attention.XFORMERS: half_only, Attention.FLASH: absent},
                                "cuda")
    assert decision.backend is Attention.SDPA
    assert decision.notice == ("attention auto: sdpa; passed over xformers (xformers takes fp16 or bf16 tensors, and "
                               "this model computes in float32)")  # what is merely not installed goes unsaid
    assert attention.decide("auto", {Attention.SDPA: None, Attention.FLASH: absent}, "cuda").notice is None
    with pytest.raises(GenkitError) as error:
        attention.decide("xformers", {Attention.XFORMERS: half_only}, "cuda")
    assert error.value.param == "attention" and "--dtype" not in str(error.value)  # a library caller's words
    assert "load the model with dtype bf16 or fp16, or use attention sdpa" in str(error.value)


def test_auto_falls_back_and_refuses_when_nothing_runs():
    broken = Problem("kernel", "PyTorch SDPA failed on a tiny call")
    fallback = attention.decide("auto", {Attention.SDPA: broken, Attention.MATH: None}, "cuda")
    assert fallback.backend is Attention.MATH and "sdpa (PyTorch SDPA failed" in fallback.notice
    assert attention.decide("auto", {Attention.SDPA: broken, Attention.XFORMERS: None}, "cuda").backend \
        is Attention.XFORMERS
    with pytest.raises(GenkitError, match="no attention backend runs here"):
        attention.decide("auto", {Attention.SDPA: broken, Attention.MATH: broken}, "cuda")


def test_the_stderr_line_is_said_once(capsys):
    attention.tell("attention auto: sdpa; passed over test-only (a reason)")
    attention.tell("attention auto: sdpa; passed over test-only (a reason)")
    attention.tell(None)
    assert capsys.readouterr().err == "genkit: attention auto: sdpa; passed over test-only (a reason)\n"


# -- the probe on this machine ----------------------------------------------------------------------------------------


def test_the_backends_that_run_on_a_cpu_pass_their_probes_and_the_others_say_why():
    for backend in (Attention.SDPA, Attention.MATH, Attention.SLICED):
        for dtype in (torch.float32, torch.bfloat16):
            assert attention.probe(backend, "cpu", dtype, 40) is None, (backend, dtype)
    for backend in (Attention.SDPA, Attention.MATH):
        assert attention.probe(backend, "cpu", torch.float32, 16, DISPATCHER, masked=True) is None
    hits = attention.probe.cache_info().hits
    attention.probe(Attention.SDPA, "cpu", torch.float32, 40)
    assert attention.probe.cache_info().hits == hits + 1  # asked once per process
    for backend in (Attention.XFORMERS, Attention.FLASH, Attention.FLASH3, Attention.SAGE):
        problem = attention.probe(backend, "cpu", torch.float16, 64, DISPATCHER)
        assert problem.kind == "device" and f"{backend.value} needs a CUDA device" in problem.text
    assert attention.requirement(Attention.SLICED, "cpu", torch.float32, DISPATCHER).kind == "unfit"


def test_info_lists_every_backend_and_whether_its_probe_ran_here():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    for name in attention.NAMES:
        assert f"attention {name}" in lines, name
    for name in ("sdpa", "math", "sliced"):
        assert lines[f"attention {name}"].split()[2] == "ran", lines[f"attention {name}"]
    for name in ("xformers", "flash", "flash3", "sage"):
        assert "no: " in lines[f"attention {name}"] or torch.cuda.is_available()
    assert "math ran" in lines["attention sdpa"]  # SDPA's own kernels, each asked
    assert lines["attention auto"].split()[2] == "sdpa"


# -- the model's shapes, what each family takes, how it is applied -----------------------------------------------------


def test_the_probe_asks_in_the_models_dtype_and_head_sizes(tiny_flux, tiny_sd):
    flux = genkit.load(str(tiny_flux), device="cpu", attention="sdpa")
    arch = DEFAULT_ARCH["flux"]
    assert attention.shapes([flux.denoiser]) == (Shape(torch.float32, arch["num_attention_heads"],
                                                       arch["attention_head_dim"]),)
    sd = genkit.load(str(tiny_sd), device="cpu", attention="sdpa")
    sd.pipe.vae.to(torch.bfloat16)  # a VAE in another dtype than the UNet (SDXL's upcast runs it in fp32)
    every = attention.shapes(sd.family.attention_modules(sd.pipe, Attention.SDPA))
    unet_only = attention.shapes(sd.family.attention_modules(sd.pipe, Attention.XFORMERS))
    assert {s.dtype for s in every} == {torch.float32, torch.bfloat16}
    assert {s.dtype for s in unet_only} == {torch.float32}
    assert set(unet_only) < set(every)  # a half-precision kernel never reaches the VAE


def test_each_family_says_which_backends_it_cannot_take():
    from genkit import families

    for family in families.all_families():
        expected = set() if family.dispatcher else {"flash", "flash3", "sage"}  # diffusers' dispatcher's alone
        if family.denoiser_name == "transformer":
            expected.add("sliced")
        if family.name == "sana":
            expected.add("xformers")  # its processors are its own, and none of them calls xformers
        assert {b.value for b in Attention if family.attention_unfit(b)} == expected, family.name
    unet = next(family for family in families.all_families() if not family.dispatcher)
    with pytest.raises(GenkitError, match="flash runs through diffusers' attention dispatcher"):
        attention.check("flash", "cuda", torch.bfloat16, unet)  # before any load, whatever the device


def test_a_family_uses_the_dispatcher_exactly_when_its_model_calls_it(tmp_path):
    """`Family.dispatcher` is what the family's real (tiny) model does: its attention processors call diffusers'
    dispatch_attention_fn, or not."""
    import inspect

    from genkit import families, testing

    for name in testing.FAMILIES:
        family = families.get(name)
        if family.file_format != "diffusers":
            assert not family.dispatcher, name
            continue
        pipe = genkit.load(str(testing.build_tiny(name, tmp_path / name)), device="cpu")
        calls = {"dispatch_attention_fn" in inspect.getsource(type(m.processor))
                 for m in family.denoiser(pipe.pipe).modules() if hasattr(m, "processor")}
        assert calls == {family.dispatcher}, (name, calls)


def processors(model) -> set[str]:
    return {type(m.processor).__name__ for m in model.modules()
            if hasattr(m, "processor") and hasattr(m, "set_processor")}


def test_xformers_reaches_a_unets_layers_and_a_joint_transformers_and_goes_back(tiny_sd, tmp_path):
    """What apply_attention sets (no call is made: this CPU cannot run xformers)."""
    sd = genkit.load(str(tiny_sd), device="cpu", attention="math")
    assert processors(sd.pipe.unet) == processors(sd.pipe.vae) == {"AttnProcessor"}
    sd.family.apply_attention(sd.pipe, Attention.XFORMERS)
    assert processors(sd.pipe.unet) == {"XFormersAttnProcessor"} and processors(sd.pipe.vae) == {"AttnProcessor2_0"}
    sd.family.apply_attention(sd.pipe, Attention.SDPA)
    assert processors(sd.pipe.unet) == processors(sd.pipe.vae) == {"AttnProcessor2_0"}
    sd3 = genkit.load(str(build_tiny("sd3", tmp_path / "sd3")), device="cpu", attention="sdpa")
    assert processors(sd3.denoiser) == {"JointAttnProcessor2_0"}
    sd3.family.apply_attention(sd3.pipe, Attention.XFORMERS)
    assert processors(sd3.denoiser) == {"XFormersJointAttnProcessor"}
    sd3.family.apply_attention(sd3.pipe, Attention.SDPA)
    assert processors(sd3.denoiser) == {"JointAttnProcessor2_0"}


# -- a choice belongs to one pipeline ---------------------------------------------------------------------------------


def latents(pipeline) -> torch.Tensor:
    """The last latents of one fixed call, as the engine makes it (inside the family's attention context): attention
    backends differ here in the last bits, where 8-bit pixels of a tiny model do not."""
    with pipeline.family.attention_context(pipeline.attention):
        args = dict(prompt=["a red circle"], num_inference_steps=2, width=32, height=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
        return pipeline.pipe(**args, **({"guidance_scale": 2.0} if pipeline.family.flow else {})).images


def backends(pipeline) -> set[str]:
    return {str(m.processor._attention_backend.value) for m in pipeline.denoiser.modules()
            if hasattr(getattr(m, "processor", None), "_attention_backend")}


def test_each_pipeline_keeps_its_own_backend(tiny_flux, tiny_chroma, tiny_sd):
    from diffusers import DiffusionPipeline
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    global_backend = _AttentionBackendRegistry._active_backend
    flux_math = genkit.load(str(tiny_flux), device="cpu", attention="math")
    alone = latents(flux_math)  # before any other model is in the process
    flux_sdpa = genkit.load(str(tiny_flux), device="cpu", attention="sdpa")  # the same model, another backend
    chroma = genkit.load(str(tiny_chroma), device="cpu", attention="math")
    sd = genkit.load(str(tiny_sd), device="cpu", attention="math")
    assert backends(flux_math) == backends(chroma) == {"_native_math"} and backends(flux_sdpa) == {"native"}
    assert not {id(m.processor) for m in flux_math.denoiser.modules() if hasattr(m, "processor")} & \
        {id(m.processor) for m in flux_sdpa.denoiser.modules() if hasattr(m, "processor")}
    assert _AttentionBackendRegistry._active_backend == global_backend  # nothing process-wide changed
    assert processors(sd.pipe.unet) == {"AttnProcessor"}

    assert torch.equal(latents(flux_math), alone)
    sdpa = latents(flux_sdpa)
    assert not torch.equal(sdpa, alone)  # the comparison sees a backend change
    assert [r.metadata[0]["attention"] for r in (p.generate(["a red circle"], seed=1, num_inference_steps=1,
                                                             width=32, height=32) for p in (flux_math, flux_sdpa))] \
        == ["math", "sdpa"]

    # another model set the way diffusers sets it (the process-wide dispatcher backend, as genkit once did):
    other = DiffusionPipeline.from_pretrained(str(tiny_flux))
    other.transformer.set_attention_backend("_native_math")
    try:
        assert torch.equal(latents(flux_sdpa), sdpa) and torch.equal(latents(flux_math), alone)
    finally:
        _AttentionBackendRegistry.set_active_backend(global_backend)

    flux_sdpa.set_attention("math")  # switching one pipeline moves it alone, and back
    assert torch.equal(latents(flux_sdpa), alone) and backends(flux_math) == {"_native_math"}
    flux_sdpa.set_attention("sdpa")
    assert torch.equal(latents(flux_sdpa), sdpa) and torch.equal(latents(flux_math), alone)
    assert backends(chroma) == {"_native_math"}
