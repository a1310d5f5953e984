"""Structured errors: a GenkitError says which setting it is about (`param`), and each front end names that setting in
its own words: the parameter for a library caller, the flag on the command line, the request's field in each HTTP
dialect. Nobody reads the message to find out (genkit.errors)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

import genkit
from genkit.cli import main
from genkit.errors import FLAGS, GenkitError, command_line, flag

# (command-line arguments after the prompt, the parameter the error is about)
BAD_FLAGS = [
    (["--steps", "0"], "num_inference_steps"),
    (["--guidance", "nan"], "guidance_scale"),
    (["--width", "5000"], "width"),
    (["--height", "0"], "height"),
    (["--seed", "-1"], "seed"),
    (["-n", "0"], "num_images_per_prompt"),
    (["--batch-size", "0"], "batch_size"),
    (["--scheduler", "nope"], "scheduler"),
    (["--attention", "flash"], "attention"),
    (["--dtype", "fp8"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--lora", "missing.safetensors"], "lora"),
    (["--image", "in.png", "--strength", "2"], "strength"),
    (["--image", "missing.png"], "image"),
    (["--outpaint", "right=8"], "outpaint"),
    (["--mask", "in.png"], "mask"),
]


def test_a_library_caller_reads_the_parameter_and_the_command_line_its_flag():
    error = GenkitError("must be at least 1, got 0", param="num_inference_steps")
    assert str(error) == "num_inference_steps must be at least 1, got 0" and error.param == "num_inference_steps"
    with command_line():
        assert str(error) == "--steps must be at least 1, got 0"
    assert error.naming("steps") == "steps must be at least 1, got 0"
    plain = GenkitError("no prompts given")
    assert str(plain) == plain.naming("anything") == "no prompts given" and plain.param is None
    assert flag("prompt") == "prompt"  # a parameter no flag sets keeps its name


@pytest.mark.parametrize("args, param", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_values_on_the_command_line_name_their_flag(tiny_mini, tmp_path, monkeypatch, args, param):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16), "red").save("in.png")
    result = CliRunner().invoke(main, ["generate", "a red circle", "-q", "--model", str(tiny_mini), "--steps", "4",
                                       "-o", "out", *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {FLAGS[param]} "), lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_flag_comes_from_param_not_from_the_message(tiny_mini, tmp_path, monkeypatch):
    """A check whose message names nothing: the command line still names the flag, from `param` alone."""
    import genkit.checks

    def refuse(value, where=None):
        raise GenkitError("is refused by this test", param="guidance_scale")

    monkeypatch.setattr(genkit.checks, "check_guidance", refuse)
    result = CliRunner().invoke(main, ["generate", "a red circle", "-q", "--model", str(tiny_mini), "--guidance", "5",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.strip() == "Error: --guidance is refused by this test"


# --- HTTP: each dialect's own field names --------------------------------------------------------------------------

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client(tiny_mini):
    from fastapi.testclient import TestClient

    from genkit.serve import Limits, create_app

    pipeline = genkit.load(str(tiny_mini), device="cpu")
    app = create_app([pipeline], limits=Limits(max_side=256, max_images=8, max_steps=50))
    with TestClient(app) as client:
        client.pipeline = pipeline
        yield client


def a1111(client, **body):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 4, **body})
    assert response.status_code == 422, response.text
    return response.json()["field"], response.json()["detail"]


def openai(client, **body):
    response = client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 4, **body})
    assert response.status_code == 422, response.text
    return response.json()["error"]["param"], response.json()["error"]["message"]


def test_the_engines_refusals_name_each_dialects_field(client):
    """Values the server's own limits pass and the engine refuses (Pipeline.plan): the field as the client spells
    it, first in the message."""
    odd = client.pipeline.size_factor * 2 + 1
    field, detail = a1111(client, width=odd)
    assert field == "width" and detail.startswith(f"width must be a positive multiple of {client.pipeline.size_factor}")
    field, message = openai(client, size=f"{odd}x{odd}")
    assert field == "size" and message.startswith("size must be a positive multiple")


# (library parameter, the check that raises it, A1111's field, OpenAI's field, a body that reaches the check)
SEAMS = [
    ("guidance_scale", "genkit.checks.check_guidance", "cfg_scale", "guidance", {"cfg_scale": 5}, {"guidance": 5}),
    ("num_inference_steps", "genkit.checks.check_steps", "steps", "steps", {}, {}),
    ("num_images_per_prompt", "genkit.checks.check_count", "batch_size", "n", {}, {}),
    ("width", "genkit.checks.check_multiple", "width", "size", {}, {}),
]


@pytest.mark.parametrize("param, check, a1111_field, openai_field, a1111_body, openai_body", SEAMS,
                         ids=[row[0] for row in SEAMS])
def test_the_field_comes_from_param_not_from_the_message(client, monkeypatch, param, check, a1111_field,
                                                         openai_field, a1111_body, openai_body):
    """The engine's check made to refuse with a message that names nothing: each dialect names its own field."""
    module, _, name = check.rpartition(".")

    def refuse(*args, **kwargs):
        raise GenkitError("is refused by this test", param=param)

    monkeypatch.setattr(__import__(module, fromlist=[name]), name, refuse)
    assert a1111(client, **a1111_body) == (a1111_field, f"{a1111_field} is refused by this test")
    assert openai(client, **openai_body) == (openai_field, f"{openai_field} is refused by this test")

