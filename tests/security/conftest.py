"""Shared by the red-team tests: a filesystem of its own (cross-filesystem and full-disk cases)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def tmpfs():
    """`with tmpfs(folder, size):` mounts a tmpfs of `size` (mount's syntax: 64k, 24m) at
    `folder` and unmounts it after; the test skips, saying why, where mounting is not
    possible (not root, or no mount in this sandbox)."""

    @contextlib.contextmanager
    def mount(folder: Path, size: str = "64k"):
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (cross-filesystem and disk-full cases)")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)

    return mount
