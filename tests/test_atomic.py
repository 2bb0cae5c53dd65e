"""Atomic writes (uio_gguf/atomic.py): the result appears whole under its name, with the permissions a
plain open() or mkdir() would give it, and nothing is left behind by a failed write."""

from __future__ import annotations

import os
import stat

import pytest

from uio_gguf.atomic import atomic_dir, atomic_file


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_file_gets_the_permissions_open_gives(tmp_path):
    with atomic_file(tmp_path / "result.bin") as tmp:
        tmp.write_bytes(b"whole")
    with open(tmp_path / "plain.bin", "wb") as f:
        f.write(b"whole")
    mode = stat.S_IMODE((tmp_path / "result.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o666 & ~_umask()
    assert (tmp_path / "result.bin").read_bytes() == b"whole"


def test_a_directory_gets_the_permissions_mkdir_gives(tmp_path):
    with atomic_dir(tmp_path / "bundle") as tmp:
        (tmp / "a.txt").write_text("a")
    (tmp_path / "plain").mkdir()
    mode = stat.S_IMODE((tmp_path / "bundle").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert (tmp_path / "bundle" / "a.txt").read_text() == "a"


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "result.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
