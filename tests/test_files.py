"""genkit.files: file digests and folder replacement that always leaves a complete copy."""

import hashlib

import pytest

from genkit import files


def test_file_sha256_is_what_sha256sum_prints(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000  # more than one 1 MiB block
    path.write_bytes(data)
    assert files.file_sha256(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_folder_puts_the_new_one_in_place(tmp_path, monkeypatch, exchange):
    if not exchange:  # the portable path: the old folder renamed aside first
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    old, new = tmp_path / "model", tmp_path / ".tmp-model"
    old.mkdir()
    (old / "weights").write_text("old")
    new.mkdir()
    (new / "weights").write_text("new")
    files.replace_folder(new, old)
    assert (old / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    fresh = tmp_path / ".tmp-other"
    fresh.mkdir()
    files.replace_folder(fresh, tmp_path / "other")  # nothing there yet: a plain rename
    assert (tmp_path / "other").is_dir() and not fresh.exists()
