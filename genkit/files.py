"""File digests: the one way genkit names a file's bytes (records, LoRA hashes, dataset fingerprints)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, what `sha256sum` prints; read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_folder(new: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Put the complete folder `new` at `folder`, replacing what is there, so that a complete copy is at `folder`
    at every moment: Linux swaps the two in one step (renameat2 RENAME_EXCHANGE), then the old one is deleted.
    Elsewhere the old folder is first renamed aside (`<folder>.old`), so a complete copy always exists on disk."""
    import shutil
    from pathlib import Path

    new, folder = Path(new), Path(folder)
    if not folder.exists():
        os.replace(new, folder)
        return
    if _exchange(new, folder):
        shutil.rmtree(new)  # now the old folder
        return
    aside = folder.with_name(folder.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    os.replace(new, folder)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a, b) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
