"""A small file system of the test's own (tmpfs with a size and an inode limit), to fill up.

Mounting needs root (the CI and development machines run as root); where it cannot be done the
test that asked is skipped with one line saying why.
"""
from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHUNK = 64 * 1024


@contextmanager
def mounted(path: Path, size: str = "16m", inodes: int = 20_000) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0755", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): "
                    "the full-disk tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_space(folder: Path) -> Path:
    """Write one file until the file system has no byte left; returns it (delete it to free the space)."""
    filler = folder / "filler.bin"
    block = b"\0" * CHUNK
    with open(filler, "wb", buffering=0) as fh:
        for _ in range(1_000_000):  # bounded: far more than any test file system holds
            try:
                fh.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for _ in range(CHUNK):  # the last partial chunk, a byte at a time
            try:
                fh.write(b"\0")
            except OSError:
                break
    return filler


def fill_inodes(folder: Path, limit: int = 100_000) -> Path:
    """Create empty files until the file system has no inode left; returns their folder."""
    many = folder / "inodes"
    many.mkdir()
    for n in range(limit):
        try:
            os.close(os.open(many / f"{n}", os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            break
    return many
