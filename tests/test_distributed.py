"""Two CPU processes (accelerate launch, gloo) make exactly the images of one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Float results depend on the thread count (reduction order), not on the process count; accelerate
# gives each of 2 CPU processes one thread, so the one-process reference runs on one thread too.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "genkit"]


def generate_args(model, out):
    return ["generate", "a red circle", "a blue square", "a green triangle", "-n", "3", "--seed", "5", "--steps", "2",
            "--batch-size", "2", "--model", str(model), "--out", str(out), "--quiet", "--json"]


def pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_two_processes_equal_one(tiny_sd, tmp_path):
    one = subprocess.run([sys.executable, "-m", "genkit", *generate_args(tiny_sd, tmp_path / "one")], env=ENV,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(LAUNCH + generate_args(tiny_sd, tmp_path / "two"), env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    records = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["index"] for r in records) == list(range(9))  # no gaps, no duplicates
    a, b = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 9
    assert all(np.array_equal(a[name], b[name]) for name in a)
    manifest = [json.loads(line) for line in (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()]
    assert [m["index"] for m in manifest] == list(range(9))
    assert not list((tmp_path / "two").glob("manifest*.jsonl"))[1:]  # one manifest

    # resume works per image across processes too
    for name in sorted(b)[3:6]:
        (tmp_path / "two" / name).unlink()
    again = subprocess.run(LAUNCH + generate_args(tiny_sd, tmp_path / "two"), env=ENV, capture_output=True, text=True)
    written = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["index"] for r in written if not r.get("skipped")) == [3, 4, 5]
    assert pngs(tmp_path / "two").keys() == a.keys()
