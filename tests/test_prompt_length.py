"""A prompt longer than the text encoder reads: the cut is said once and recorded, never silent (#16)."""

import json
import subprocess
import sys
import warnings

import pytest

import genkit
from genkit.prompts import PromptWarning

LONG = "a red circle on the left " + " ".join(f"and a small blue square number {i}" for i in range(20))


@pytest.mark.parametrize("model, tokens", [("tiny_mini", 24), ("tiny_sd", 77)])
def test_a_long_prompt_is_warned_once_and_recorded(model, tokens, request):
    pipeline = genkit.load(str(request.getfixturevalue(model)), device="cpu")
    if pipeline.long_prompts == "chunk":  # CLIP reads a long prompt in chunks by default (tests/test_long_prompts.py)
        pipeline.set_long_prompts("truncate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipeline.generate([LONG, LONG, "a red circle"], num_inference_steps=1, seed=1)
    said = [w for w in caught if issubclass(w.category, PromptWarning)]
    assert len(said) == 1 and f"longer than the {tokens} tokens" in str(said[0].message)
    cut = result.metadata[0]["prompt_truncated"]
    assert cut["tokens"] == tokens and cut["dropped"][:40] in str(said[0].message)
    squeezed = cut["dropped"].replace(" ", "")  # a tiny vocabulary spells "19" as "1 9"
    assert LONG.replace(" ", "").endswith(squeezed) and 20 < len(squeezed) < len(LONG) - 40
    assert result.metadata[1]["prompt_truncated"] == cut and "prompt_truncated" not in result.metadata[2]


def test_the_cli_says_it_in_one_line(tiny_mini, tmp_path):
    done = subprocess.run([sys.executable, "-m", "genkit", "generate", LONG, "--model", str(tiny_mini), "--steps", "1",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "longer than" in line]
    assert len(lines) == 1 and lines[0].startswith("genkit: warning: prompt 'a red circle on the left and a small")
    assert "Traceback" not in done.stderr and "warnings.warn" not in done.stderr
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["prompt_truncated"]["tokens"] == 24
