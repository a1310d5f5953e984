"""The memory plan applied, and out of memory never a traceback (#27), on the CPU with tiny real models.

Placements: a plan's step is applied with diffusers' own calls, onto the CPU (`onload_device="cpu"`) where diffusers
allows it, and the hooks they install are checked; the images are those of the pipeline as loaded. Out of memory:
torch's real `torch.OutOfMemoryError` is raised from a forward pre-hook on the tiny model's denoiser or VAE decoder
(the first call only: the batch is retried with the next step and the images are still made; always: one line,
exit 2, nothing written; through the server: a 507 with the message, and the next request served).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import genkit
from genkit import memory
from genkit.cli import main

SETTINGS = {"num_inference_steps": 2, "seed": 7, "num_images_per_prompt": 2, "batch_size": 2}


def pixels(result) -> list:
    return [np.asarray(image) for image in result.images]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from genkit.testing import build_tiny

    return build_tiny("sd", tmp_path_factory.mktemp("oom") / "tiny-sd")


@pytest.fixture(scope="module")
def reference(sd):
    """The tiny SD's images as loaded, no plan (a CPU)."""
    return pixels(genkit.load(str(sd), device="cpu").generate(["a red circle"], **SETTINGS))


def out_of_memory_once(module):
    """A pre-hook on `module` raising torch's real OutOfMemoryError on its first call; returns (handle, calls)."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

    return module.register_forward_pre_hook(hook), calls


# -- The plan, applied -----------------------------------------------------------------------------------------------

def test_the_plan_is_off_on_a_cpu_and_recorded_as_none(sd):
    pipeline = genkit.load(str(sd), device="cpu")
    assert pipeline.memory_step == memory.Step() and pipeline.settings()["memory_plan"] == "none"
    assert not any(hasattr(m, "_hf_hook") for m in pipeline.pipe.components.values())


def test_each_placement_is_diffusers_own_call_and_makes_the_same_images(sd, reference):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    pipeline = genkit.load(str(sd), device="cpu")
    pipe = pipeline.pipe
    checks = {
        "gpu": lambda: not any(hasattr(m, "_hf_hook") for m in (pipe.unet, pipe.vae, pipe.text_encoder)),
        "text-encoders-offloaded": lambda: hasattr(pipe.text_encoder, "_hf_hook") and hasattr(pipe.unet, "_hf_hook")
        and not hasattr(pipe.vae, "_hf_hook") and pipe.text_encoder._hf_hook.prev_module_hook.model is pipe.unet,
        "model-offload": lambda: pipe._offload_gpu_id == 0 and len(pipe._all_hooks) == 3,
        "group-offload": lambda: all(_is_group_offload_enabled(m) for m in (pipe.unet, pipe.vae, pipe.text_encoder)),
    }
    for placement, installed in checks.items():  # each from the one before: an offload is undone first
        memory.apply(pipe, memory.Step(placement), "cpu")
        assert installed(), placement
        pipeline.memory_step = memory.Step(placement)
        result = pipeline.generate(["a red circle"], **SETTINGS)
        assert all(np.array_equal(a, b) for a, b in zip(pixels(result), reference)), placement
        assert result.metadata[0]["memory_plan"] == placement
    # sequential offload: accelerate's per-layer hooks (running it on a CPU fails inside accelerate's move to "meta"
    # with torch 2.13, so only the installation is checked here; benchmarks/gpu.py runs it)
    memory.apply(pipe, memory.Step("sequential-offload", "tiled"), "cpu")
    assert hasattr(pipe.unet.conv_in, "_hf_hook") and pipe.unet.conv_in._hf_hook.execution_device == torch.device("cpu:0")
    assert not any(_is_group_offload_enabled(m) for m in (pipe.unet, pipe.vae))
    assert pipe.vae.use_slicing and pipe.vae.use_tiling


def test_a_cuda_plan_steps_down_through_the_placements_as_memory_shrinks(sd):
    """What genkit.load applies on CUDA: plans of the tiny SD for ever smaller budgets (its configs, a GPU that is not
    here), each mapped to its step; the steps come in the planner's order."""
    meta = memory.meta_model(str(sd))
    budget, chosen = 1 << 40, []
    while True:
        plan = memory.plan(meta, device="cuda", memory=budget, batch_size=4)
        if not plan.fits:
            break
        chosen.append(memory.step_of(plan))
        budget = plan.predicted_peak_bytes - 1
    order = list(memory.PLACEMENTS)
    assert chosen[0] == memory.Step("gpu") and len(chosen) >= 3
    at = [(-(s.batch or 4), order.index(s.placement)) for s in chosen]  # the batch halved last, as the planner orders
    assert at == sorted(at) and {s.placement for s in chosen} == set(order)
    assert memory.plan(meta, device="cuda", memory=budget, batch_size=4, step=chosen[-1]).predicted_peak_bytes > budget


def test_memory_is_an_amount_before_the_load(sd):
    with pytest.raises(genkit.GenkitError) as error:
        genkit.load(str(sd), device="cpu", memory="lots")
    assert error.value.param == "memory"


# -- Out of memory -----------------------------------------------------------------------------------------------------

def test_out_of_memory_in_the_decode_retries_with_the_vae_sliced(sd, reference, capsys):
    pipeline = genkit.load(str(sd), device="cpu")
    handle, calls = out_of_memory_once(pipeline.pipe.vae.decoder)
    try:
        result = pipeline.generate(["a red circle"], **SETTINGS)
    finally:
        handle.remove()
    assert len(calls) == 3  # the batch's decode ran out; then one image at a time
    assert all(np.array_equal(a, b) for a, b in zip(pixels(result), reference))
    assert pipeline.pipe.vae.use_slicing and pipeline.memory_step.vae == "sliced"
    assert result.metadata[0]["memory_plan"] == "VAE sliced (after running out of memory)"
    assert "out of memory in the decode of 2 image(s) with none; retrying with VAE sliced" in capsys.readouterr().err


def test_out_of_memory_in_the_denoiser_retries_with_half_the_batch(sd, reference, capsys):
    pipeline = genkit.load(str(sd), device="cpu")
    handle, calls = out_of_memory_once(pipeline.pipe.unet)
    try:
        result = pipeline.generate(["a red circle"], **SETTINGS)
        later = pipeline.generate(["a red circle"], **SETTINGS)  # the step stays: two calls of one image again
    finally:
        handle.remove()
    assert len(calls) == 1 + 2 * 2 + 2 * 2  # the first call; then 2 steps for each image alone, in both calls
    assert all(np.array_equal(a, b) for a, b in zip(pixels(result), reference))
    assert all(np.array_equal(a, b) for a, b in zip(pixels(later), reference))
    assert [m["memory_plan"] for m in result.metadata] == ["batch 1 (after running out of memory)"] * 2
    assert "out of memory in the denoising of 2 image(s) with none; retrying with batch 1" in capsys.readouterr().err


def _always_out_of_memory(module, args):
    if type(module).__name__ == "UNet2DConditionModel":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")


def test_out_of_memory_again_is_one_line_exit_2_and_nothing_written(sd, tmp_path):
    out = tmp_path / "out"
    hook = torch.nn.modules.module.register_module_forward_pre_hook(_always_out_of_memory)
    try:
        result = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(sd), "--out", str(out),
                                           "--steps", "2", "--seed", "1", "-n", "2", "--batch-size", "2", "--quiet"])
    finally:
        hook.remove()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-2] == ("genkit: out of memory in the denoising of 2 image(s) with none; retrying with batch 1 "
                         "(after running out of memory)")
    error = lines[-1]
    for needle in ("Error: out of memory on cpu making 2 image(s) of 64x64, also with batch 1", "the plan estimates",
                   "MiB for that step", "--memory", "nothing of this batch was saved"):
        assert needle in error, error
    assert not list(out.glob("*.png")) and not (out / "manifest.jsonl").exists()


def test_the_server_answers_507_and_serves_the_next_request(sd):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from genkit.serve import create_app
    from tests.test_serve import LIMITS, serving

    pipeline = genkit.load(str(sd), device="cpu")
    failing = [True]

    def hook(module, args):
        if failing[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")

    handle = pipeline.pipe.unet.register_forward_pre_hook(hook)
    served = serving(create_app([pipeline], limits=LIMITS), None)
    server = next(served)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            body = {"prompt": "a red circle", "steps": 2, "seed": 3}
            refused = client.post("/sdapi/v1/txt2img", json=body)
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"] == "out_of_memory"
            assert refused.json()["detail"].startswith("out of memory on cpu making 1 image(s) of 64x64, also with none")
            openai = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x64"})
            assert openai.status_code == 507 and openai.json()["error"]["type"] == "server_error"
            failing[0] = False
            served_now = client.post("/sdapi/v1/txt2img", json=body)
            assert served_now.status_code == 200 and len(served_now.json()["images"]) == 1
    finally:
        handle.remove()
        next(served, None)
