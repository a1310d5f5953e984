"""Every user mistake: one line naming the value and the fix, exit code 2, no traceback, nothing written."""

import shutil

import pytest
from click.testing import CliRunner

from genkit.cli import main


def fails(args, *needles, out=None):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), "something was written"
    return lines[0]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def gen(model, out, *args):
    return ["generate", "--model", model, "--out", out, "--steps", 2, "--quiet", *args]


def test_unknown_preset_or_missing_folder(out):
    fails(gen("no-such-model", out, "a"), "no-such-model", "preset", out=out)
    fails(gen("./missing/folder", out, "a"), "./missing/folder", out=out)


def test_folder_without_model_index(tmp_path, out):
    (tmp_path / "empty").mkdir()
    fails(gen(tmp_path / "empty", out, "a"), "model_index.json", "save_pretrained", out=out)


def test_size_not_a_multiple(tiny_sd, out):
    fails(gen(tiny_sd, out, "a", "--width", 50), "width must be a positive multiple of 8", "got 50", "48 or 56", out=out)
    fails(gen(tiny_sd, out, "a", "--height", 0), "height", out=out)


def test_steps_and_guidance(tiny_sd, out):
    fails(["generate", "--model", tiny_sd, "--out", out, "--steps", 0, "a"], "steps", "at least 1", "got 0", out=out)
    fails(gen(tiny_sd, out, "a", "--guidance", -1), "guidance", "got -1.0", out=out)


def test_empty_prompts(tiny_sd, tmp_path, out):
    fails(gen(tiny_sd, out), "no prompts", out=out)
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    fails(gen(tiny_sd, out, "--prompts-file", empty), str(empty), "no prompts", out=out)
    fails(gen(tiny_sd, out, "  "), "empty", out=out)


def test_malformed_jsonl_names_the_line(tiny_sd, tmp_path, out):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    fails(gen(tiny_sd, out, "--prompts-file", bad), "line 2", "not valid JSON", out=out)
    bad.write_text('{"prompt": "fine"}\n\n{"text": "no prompt key"}\n')
    fails(gen(tiny_sd, out, "--prompts-file", bad), "line 3", '"prompt"', out=out)
    bad.write_text('{"prompt": "fine", "stpes": 3}\n')
    fails(gen(tiny_sd, out, "--prompts-file", bad), "line 1", "stpes", out=out)


def test_unknown_scheduler_lists_valid_ones(tiny_sd, out):
    fails(gen(tiny_sd, out, "a", "--scheduler", "heun"), "heun", "ddim, euler, euler-a, dpm++, unipc, ddpm", out=out)


def test_xformers_missing(tiny_sd, out):
    fails(gen(tiny_sd, out, "a", "--attention", "xformers", "--device", "cpu"), "xformers needs a CUDA device",
          "sdpa", out=out)
    fails(gen(tiny_sd, out, "a", "--attention", "flash"), "flash", "auto, xformers, sdpa, sliced, math", out=out)


def test_compile_without_a_cpp_compiler(tiny_sd, out):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/no/such/g++",)}):
        fails(gen(tiny_sd, out, "a", "--compile"), "--compile", "C++ compiler", "g++", out=out)


def test_out_is_a_file_or_not_writable(tiny_sd, tmp_path):
    file = tmp_path / "taken.png"
    file.write_bytes(b"x")
    fails(gen(tiny_sd, file, "a"), str(file), "is a file")
    fails(gen(tiny_sd, file / "sub", "a"), "is a file")
    assert file.read_bytes() == b"x"


def test_pickle_weights_refused_unless_allowed(tiny_sd, tmp_path, out):
    import torch
    from safetensors.torch import load_file

    copy = tmp_path / "pickled"
    shutil.copytree(tiny_sd, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    fails(gen(copy, out, "a"), "pickle", "--allow-pickle", str(copy / "unet"), out=out)
    result = CliRunner().invoke(main, [str(a) for a in gen(copy, out, "a", "--allow-pickle", "--seed", 1)])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 1


def test_train_and_eval_inputs(tmp_path):
    fails(["train", "base", "--config", tmp_path / "nope.toml", "--out", tmp_path / "run"], "nope.toml")
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[train]\nstpes = 3\n")
    fails(["train", "base", "--config", recipe, "--out", tmp_path / "run"], "stpes", "valid:")
