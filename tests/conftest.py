import os

# Child processes (the CLI run as a real process, accelerate launch) run torch on one thread too: beside a busy
# core, two OpenMP threads spin-wait for each other (the killed-run test took 400 s so on a busy machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.tiny_models import build_tiny_mini, build_tiny_sd  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on one thread: when the machine's other core is busy, two OpenMP threads spin-wait for each
    other (measured: a tiny SD image in 0.97 s on one thread, 20 s on two beside another job). Pixel comparisons
    are within one process, so they hold at any thread count; tests/test_exactness.py checks two threads too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_mini(tmp_path_factory):
    return build_tiny_mini(tmp_path_factory.mktemp("models") / "tiny-mini")


@pytest.fixture(params=["tiny_sd", "tiny_mini"])
def model_dir(request):
    """Contract tests run once per pipeline kind."""
    return request.getfixturevalue(request.param)


@pytest.fixture(autouse=True)
def genkit_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENKIT_HOME", str(tmp_path / "genkit-home"))
