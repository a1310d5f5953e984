"""One atomic write: every file genkit leaves on disk goes through `genkit.outputs.atomic_write` (or, for a folder,
`atomic_folder`), so a killed or failing writer never leaves a partial file.

The source check below finds every call that writes a file (open for writing, write_text/write_bytes, PIL's, torch's
and safetensors' save, diffusers' save_pretrained/save_lora_weights, json.dump, renames) and accepts it only inside
a function handed to one of those two helpers, or on the short allow-list with its reason.
"""

import ast
import json
from pathlib import Path

import pytest
from PIL import Image

from genkit import outputs
from genkit.errors import GenkitError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genkit"
HELPERS = ("atomic_write", "atomic_folder")

WRITING_METHODS = {"write_text", "write_bytes", "save", "save_file", "save_pretrained", "save_lora_weights",
                   "save_lora", "save_config", "to_json_file", "dump", "rename"}
WRITING_NAMES = {"save_file", "copyfile", "copy2", "copytree"}
MODULE_WRITES = {"os": {"replace", "rename", "renames", "link", "symlink"},
                 "shutil": {"copy", "copy2", "copyfile", "copytree", "move"}}

# (file, enclosing function, the call as written): why it may write without the helper
ALLOWED = {
    ("genkit/outputs.py", "_replace_with", "os.replace"): "the helper itself: the rename that makes a write atomic",
    ("genkit/files.py", "replace_folder", "os.replace"): "the helper's folder swap (atomic_folder's last step)",
    ("genkit/outputs.py", "OutputWriter.write", "open"): "manifest.jsonl's progress line, appended per image; "
    "close() rewrites the manifest whole through save_text and drops a line a kill cut short",
    ("genkit/train/shared.py", "LossLog.__init__", "path.open"): "loss.jsonl, appended per step so the run can be "
    "followed; a resumed run rewrites it through save_text and drops a line a kill cut short",
    ("genkit/families/base.py", "Family.save_lora", "type(pipe).save_lora_weights"): "writes where its caller says: "
    "genkit.train.lora._export hands it atomic_write's temporary file",
    ("genkit/families/genkit_mini/__init__.py", "GenkitMini.save_lora", "StableDiffusionPipeline.save_lora_weights"):
        "as Family.save_lora",
    ("genkit/families/pixart.py", "PixArtSigma.save_lora", "save_file"): "as Family.save_lora",
    ("genkit/testing.py", "_saved", "builder(arch).save_pretrained"): "tiny random-weight models for tests and "
    "benchmarks, written into a folder the caller makes for them",
    ("genkit/testing.py", "_qwen_image_edit", "pipe.save_pretrained"): "as _saved: a tiny Qwen-Image-Edit folder",
    ("genkit/testing.py", "_qwen_image_edit", "components['tokenizer'].save_pretrained"): "as _saved: its processor",
    ("genkit/testing.py", "_qwen_image_edit",
     "Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained"): "as _saved: its processor",
    ("genkit/testing.py", "build_tiny_controlnet", "controlnet.save_pretrained"): "as _saved: a tiny ControlNet",
    ("genkit/testing.py", "build_tiny_ip_adapter", "encoder.save_pretrained"): "as _saved: a tiny IP-Adapter's "
    "image encoder",
    ("genkit/testing.py", "build_tiny_ip_adapter", "save_file"): "as _saved: a tiny IP-Adapter's weights",
    ("genkit/families/base.py", "UNetFamily.load_controlnet_file", "(Path(folder) / 'config.json').write_text"):
        "a config for diffusers' from_single_file in a private TemporaryDirectory, gone when it returns",
    ("genkit/serve/store.py", "ImageStore.input_picture", "picture.pixels.save"): "PNG bytes into memory (BytesIO), "
    "hashed, then written by keep_input through atomic_write",
    ("genkit/serve/service.py", "Service.deliver", "self.store.save"): "ImageStore.save: OutputWriter.write, which "
    "writes the PNG through save_png",
}


def _writes(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        if func.id == "open":
            mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
            return _writing_mode(mode)
        return func.id in WRITING_NAMES
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr == "open":  # Path.open(mode); Image.open(file) reads
        mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
        if mode is None and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
            mode = call.args[0]
        return mode is not None and _writing_mode(mode)
    if isinstance(func.value, ast.Name) and func.value.id in MODULE_WRITES:
        return func.attr in MODULE_WRITES[func.value.id]
    return func.attr in WRITING_METHODS


def _writing_mode(mode) -> bool:
    if mode is None:
        return False
    if not (isinstance(mode, ast.Constant) and isinstance(mode.value, str)):
        return True  # a mode decided at run time: assume it writes
    return any(c in mode.value for c in "wax+")


def _genkit_names(tree) -> set[str]:
    """Names bound by `from genkit... import X` / `import genkit...`: calling X.save is a genkit function, whose own
    writes are checked where they are written."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genkit"):
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name.startswith("genkit")}
    return names


def _callbacks(tree) -> set[ast.AST]:
    """The functions handed to atomic_write/atomic_folder: lambdas written in the call, or functions named there."""
    found, named = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in HELPERS and len(node.args) > 1:
                if isinstance(node.args[1], ast.Lambda):
                    found.add(node.args[1])
                elif isinstance(node.args[1], ast.Name):
                    named.add(node.args[1].id)
    found |= {node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name in named}
    return found


def unprotected_writes() -> list[tuple[str, str, str, int]]:
    """(file, enclosing function, call, line) of every write not inside a helper's callback."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        genkit_names, callbacks = _genkit_names(tree), _callbacks(tree)

        def visit(node, scope: list[str], protected: bool):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scope = [*scope, node.name]
            protected = protected or node in callbacks
            if isinstance(node, ast.Call) and not protected and _writes(node):
                func = node.func
                receiver = func.value if isinstance(func, ast.Attribute) else None
                if not (isinstance(receiver, ast.Name) and receiver.id in genkit_names):
                    found.append((str(path.relative_to(ROOT)), _function(scope), ast.unparse(func), node.lineno))
            for child in ast.iter_child_nodes(node):
                visit(child, scope, protected)

        visit(tree, [], False)
    return found


def _function(scope: list[str]) -> str:
    """The outer function with its class: `OutputWriter.write`, `_saved` (nested functions are their parent's)."""
    return ".".join(scope[:2]) if len(scope) > 1 and scope[0][:1].isupper() else (scope[0] if scope else "<module>")


def test_every_write_goes_through_the_one_helper():
    bad = [w for w in unprotected_writes() if w[:3] not in ALLOWED]
    assert not bad, "writes outside genkit.outputs.atomic_write/atomic_folder (write inside the callback, or add " \
                    f"an ALLOWED entry with its reason): {bad}"


def test_the_allow_list_holds_only_writes_that_exist():
    seen = {w[:3] for w in unprotected_writes()}
    assert not [key for key in ALLOWED if key not in seen], "stale ALLOWED entries"


def test_the_check_sees_each_kind_of_write(tmp_path):
    """The checker's own test: each kind of write it must catch, outside and inside a callback."""
    source = '''
from PIL import Image
import json, os, torch
from safetensors.torch import save_file
from genkit.outputs import atomic_write

def bad(image, path, tensors, folder, pipe):
    open(path, "w").write("x")
    path.open("ab")
    path.write_text("x")
    image.save(path)
    torch.save(tensors, path)
    save_file(tensors, path)
    json.dump({}, open(path, mode="w"))
    pipe.save_pretrained(folder)
    os.replace(path, folder)

def good(image, path):
    atomic_write(path, lambda tmp: image.save(tmp))
    def write(tmp):
        tmp.write_text("x")
    atomic_write(path, write)
    open(path).read()
    Image.open(path)
'''
    tree = ast.parse(source)
    callbacks = _callbacks(tree)
    protected = set()
    for node in ast.walk(tree):
        if node in callbacks:
            protected |= {id(n) for n in ast.walk(node)}
    bad = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call) and _writes(n)
           and id(n) not in protected]
    assert sorted(bad) == sorted(["open", "open", "path.open", "path.write_text", "image.save", "torch.save",
                                  "save_file", "json.dump", "pipe.save_pretrained", "os.replace"])


# --- behaviour: an interrupted write leaves no partial file ---------------------------------------------------


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("error", [RuntimeError("the writer failed"), KeyboardInterrupt()])
def test_a_write_interrupted_inside_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "report.json"

    def half_then_fail(tmp):
        Path(tmp).write_text('{"half": ')
        raise error

    with pytest.raises(type(error)):
        outputs.atomic_write(path, half_then_fail)
    assert _listing(tmp_path) == []  # nothing: neither the file nor a temporary
    outputs.save_text(path, '{"whole": 1}')
    with pytest.raises(type(error)):
        outputs.atomic_write(path, half_then_fail)
    assert _listing(tmp_path) == ["report.json"] and json.loads(path.read_text()) == {"whole": 1}


def test_a_png_whose_encoder_fails_midway_is_not_left_behind(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    path = tmp_path / "grid.png"
    outputs.save_png(Image.new("RGB", (8, 8), (255, 0, 0)), path)

    def broken(image, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n")  # the signature, then the encoder dies
        raise OSError("encoder failed")

    monkeypatch.setattr(PngImagePlugin, "_save", broken)
    monkeypatch.setitem(Image.SAVE, "PNG", broken)
    with pytest.raises(OSError, match="encoder failed"):
        outputs.save_png(Image.new("RGB", (8, 8), (0, 0, 255)), path)
    assert _listing(tmp_path) == ["grid.png"]
    with Image.open(path) as image:
        assert image.getpixel((0, 0)) == (255, 0, 0)


def test_a_full_disk_is_one_genkit_error_and_no_partial_file(tmp_path):
    import errno

    def full(tmp):
        (Path(tmp) / "unet" if Path(tmp).is_dir() else Path(tmp)).write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(GenkitError, match="cannot write .*weights.safetensors: No space left on device"):
        outputs.atomic_write(tmp_path / "weights.safetensors", full)
    with pytest.raises(GenkitError, match="cannot write .*final: No space left"):
        outputs.atomic_folder(tmp_path / "final", full)
    assert _listing(tmp_path) == []


def test_a_checkpoint_interrupted_midway_leaves_the_earlier_ones_complete(tmp_path, monkeypatch):
    import torch

    from genkit.train import checkpoint

    tensors = {"lora": {"a": torch.ones(3)}, "optimizer": {"0.exp_avg": torch.zeros(3)}}
    checkpoint.save(tmp_path, 2, tensors, {"note": "two"})
    before = _listing(tmp_path)
    real = checkpoint.save_file
    calls = []

    def dies_on_the_second_file(group, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\x00" * 5)
            raise KeyboardInterrupt  # killed while writing the optimizer's tensors
        real(group, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 4, tensors, {"note": "four"})
    assert _listing(tmp_path) == before  # no checkpoint-0000004, no temporary folder
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["checkpoint-0000002"]
    loaded, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["note"] == "two" and torch.equal(loaded["lora"]["a"], torch.ones(3))
    # the same step written again replaces the folder whole
    monkeypatch.setattr(checkpoint, "save_file", real)
    checkpoint.save(tmp_path, 2, {"lora": {"a": torch.full((3,), 7.0)}}, {"note": "again"})
    loaded, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["note"] == "again" and set(loaded) == {"lora"} and _listing(tmp_path) == [
        "checkpoint-0000002", "checkpoint-0000002/lora.safetensors", "checkpoint-0000002/state.json"]


def test_a_base_export_interrupted_midway_keeps_the_complete_model(tmp_path, monkeypatch):
    """genkit train base's final folder: a kill while writing the new one leaves the old one whole."""
    from genkit.cli import _recipe_path
    from genkit.train import base

    recipe = base.load_recipe(_recipe_path("genkit-mini-tiny"), [])
    unet = base.build_unet(recipe.model)
    folder = base.export(unet, tmp_path / "final", recipe)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    class Dying:
        def save_pretrained(self, where):
            Path(where).mkdir(parents=True)
            (Path(where) / "scheduler_config.json").write_text("{")
            raise KeyboardInterrupt

    monkeypatch.setattr(base, "noise_scheduler", Dying)
    with pytest.raises(KeyboardInterrupt):
        base.export(unet, tmp_path / "final", recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_what_a_kill_between_the_two_steps_left_is_removed_by_the_next_write(tmp_path):
    stale_file = tmp_path / ".grid-0123abcd.png.tmp"
    stale_file.write_bytes(b"half")
    stale_folder = tmp_path / ".final-89abcdef.tmp"
    (stale_folder / "unet").mkdir(parents=True)
    other = tmp_path / ".grids-0123abcd.png.tmp"  # another file's temporary (grids.png): not this one's
    other.write_bytes(b"x")
    outputs.save_png(Image.new("RGB", (4, 4)), tmp_path / "grid.png")
    outputs.atomic_folder(tmp_path / "final", lambda tmp: (Path(tmp) / "model_index.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".grids-0123abcd.png.tmp", "final", "grid.png"]


def test_a_loss_log_line_a_kill_cut_short_is_dropped_on_resume(tmp_path):
    from genkit.train.shared import LossLog

    path = tmp_path / "loss.jsonl"
    path.write_text('{"step": 1, "loss": 0.5, "time": 0.1}\n{"step": 2, "loss": 0.4, "time": 0.2}\n{"step": 3, "lo')
    with LossLog(path, 2) as log:
        log.write(3, 0.25)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
