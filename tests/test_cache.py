"""The memory cache (memory files and start states) stays under $UIO_GGUF_MEMORY_CACHE_GB, least
recently used first out, and never loses the file just written."""

from __future__ import annotations

import os

import numpy as np
import pytest

from uio_gguf import cache
from uio_gguf.memory.encoder import SegmentMemory
from uio_gguf.store import memory_file, start_state


@pytest.fixture
def memory_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cache.MEMORY_LIMIT_ENV, raising=False)
    return tmp_path / "cache" / "memory"


def _save(name: str, seed: int, when: float):
    """A real memory file of ~33 KB in the cache, its mtime set to `when` (seconds ago)."""
    k = np.random.default_rng(seed).standard_normal((4, 2, 16, 64)).astype(np.float32)
    path = memory_file.save(memory_file.path_for(name), name, SegmentMemory(k, -k))
    stamp = path.stat().st_mtime - when
    os.utime(path, (stamp, stamp))
    return path


def test_the_least_recently_used_files_go_first(memory_cache, monkeypatch):
    a, b, c = _save("a", 0, 300), _save("b", 1, 200), _save("c", 2, 100)
    size = a.stat().st_size
    assert memory_file.load(a, "a") is not None  # reading a makes it the most recently used
    monkeypatch.setenv(cache.MEMORY_LIMIT_ENV, str(3.5 * size / 2**30))  # room for three files
    state = start_state.path_for(a, "s")  # a's start state
    start_state.save(state, "s", np.arange(size // 2, dtype=np.uint8) % 251)
    assert not b.exists()  # b was the least recently used: a was read after it
    assert sorted(p.name for p in memory_cache.glob("*.npz")) == ["a.npz", "a.s.start.npz", "c.npz"]
    d = _save("d", 3, 0)  # written now: c (read least recently) goes, then nothing more
    assert not c.exists() and a.exists() and d.exists() and state.exists()
    assert memory_file.load(d, "d") is not None and start_state.load(state, "s") is not None


def test_the_file_just_written_stays_even_alone_over_the_limit(memory_cache, monkeypatch):
    old = _save("old", 0, 100)
    monkeypatch.setenv(cache.MEMORY_LIMIT_ENV, str(old.stat().st_size / 2 / 2**30))
    new = _save("new", 1, 0)
    assert new.exists() and not old.exists()


def test_files_outside_the_cache_and_a_limit_of_0_are_left_alone(memory_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(cache.MEMORY_LIMIT_ENV, "0")
    kept = [_save(name, seed, 100 - seed) for seed, name in enumerate("abc")]
    monkeypatch.setenv(cache.MEMORY_LIMIT_ENV, "1e-9")
    k = np.ones((1, 2, 4, 8), np.float32)
    memory_file.save(tmp_path / "elsewhere.npz", "x", SegmentMemory(k, k))
    assert all(path.exists() for path in kept)


@pytest.mark.parametrize("value", ["lots", "-1", "inf", "nan"])
def test_a_limit_that_is_not_a_size_warns_and_keeps_the_default(monkeypatch, value):
    monkeypatch.setenv(cache.MEMORY_LIMIT_ENV, value)
    with pytest.warns(UserWarning, match=cache.MEMORY_LIMIT_ENV):
        assert cache.memory_limit_bytes() == int(cache.DEFAULT_MEMORY_LIMIT_GB * 2**30)


def test_a_memory_file_and_its_start_state_are_kept_or_dropped_together(memory_cache, monkeypatch):
    """With room for one memory file, writing its start state dropped the memory file (older),
    leaving a start state of no use; every run then compressed again."""
    a = _save("a", 0, 300)
    size = a.stat().st_size
    monkeypatch.setenv(cache.MEMORY_LIMIT_ENV, str(1.2 * size / 2**30))  # the pair does not fit
    a_state = start_state.path_for(a, "s")
    start_state.save(a_state, "s", np.arange(size // 2, dtype=np.uint8) % 251)
    assert a.exists() and a_state.exists()  # the pair is what was just written: kept whole
    b = _save("b", 1, 0)
    assert b.exists() and not a.exists() and not a_state.exists()  # a goes with its start state


def test_a_start_state_whose_memory_file_is_gone_is_dropped(memory_cache, monkeypatch):
    a = _save("a", 0, 300)
    a_state = start_state.path_for(a, "s")
    start_state.save(a_state, "s", np.arange(1000, dtype=np.uint8))
    a.unlink()  # removed by hand, or by an older uio-gguf that trimmed file by file
    monkeypatch.setenv(cache.MEMORY_LIMIT_ENV, "1")  # plenty of room
    b = _save("b", 1, 0)
    assert b.exists() and not a_state.exists()
