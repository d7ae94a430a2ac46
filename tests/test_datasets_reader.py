"""The io_uring reader and its thread-pool fallback return identical bytes and name failing files."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from blazil_ai.datasets.reader import ThreadReader, UringReader, open_reader
from blazil_ai.errors import ConfigError, DataError


def _uring_or_skip() -> UringReader:
    try:
        return UringReader(32)
    except (ImportError, OSError) as e:
        pytest.skip(f"io_uring unavailable on this kernel/sandbox: {e}")


@pytest.fixture(params=["uring", "threads"])
def reader(request):
    r = _uring_or_skip() if request.param == "uring" else ThreadReader(8)
    yield r
    r.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(150):  # more files than the queue depth, of varied sizes, one empty
        p = d / f"f{i:03d}.bin"
        p.write_bytes(rng.integers(0, 256, int(rng.integers(0, 9000)) if i else 0, dtype=np.uint8).tobytes())
        paths.append(p)
    return paths


def test_read_files_returns_each_files_bytes(reader, files):
    batch = reader.read_files(files)
    assert len(batch) == len(files)
    for i, p in enumerate(files):
        assert batch[i].tobytes() == p.read_bytes()
    assert batch.nbytes == sum(p.stat().st_size for p in files)
    again = reader.read_files(files[::-1], [p.stat().st_size for p in files[::-1]])
    assert again[0].tobytes() == files[-1].read_bytes()


def test_backends_agree(files):
    u = _uring_or_skip()
    with ThreadReader(4) as t:
        a, b = u.read_files(files), t.read_files(files)
        assert np.array_equal(a.buffer, b.buffer) and np.array_equal(a.offsets, b.offsets)
    u.close()


def test_large_file_in_blocks(reader, tmp_path):
    p = tmp_path / "big.bin"
    data = np.random.default_rng(1).integers(0, 256, (5 << 20) + 123, dtype=np.uint8)
    p.write_bytes(data.tobytes())
    assert np.array_equal(reader.read_file(p), data)
    out = np.zeros(len(data) + 10, dtype=np.uint8)
    reader.read_file(p, out)
    assert np.array_equal(out[:len(data)], data)


def test_missing_file_is_named(reader, files, tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(DataError, match=r"nope\.wav: cannot (open|read): No such file"):
        reader.read_files([files[1], missing, files[2]], [files[1].stat().st_size, 10, files[2].stat().st_size])


def test_short_read_is_named(reader, files):
    sizes = [p.stat().st_size for p in files[1:4]]
    sizes[1] += 100  # the file is shorter than the scan said: truncated since
    with pytest.raises(DataError, match=rf"{files[2].name}: short read: got {sizes[1] - 100} of {sizes[1]} bytes"):
        reader.read_files(files[1:4], sizes)


def test_no_descriptor_leaks_after_errors(reader, files, tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(DataError):
            reader.read_files([*files[1:40], tmp_path / "missing"])
        reader.read_files(files[1:40])
    assert len(os.listdir("/proc/self/fd")) <= before


def test_blazil_io_forces_backend(monkeypatch, caplog):
    monkeypatch.setenv("BLAZIL_IO", "threads")
    with open_reader() as r:
        assert r.backend == "threads"
    monkeypatch.setenv("BLAZIL_IO", "bogus")
    with pytest.raises(ConfigError, match="BLAZIL_IO"):
        open_reader()
    monkeypatch.setenv("BLAZIL_IO", "uring")
    _uring_or_skip().close()
    with caplog.at_level(logging.WARNING), open_reader() as r:
        assert r.backend == "uring"


def test_large_file_not_in_page_cache(reader, tmp_path):
    """The in-order path for uncached files (evicted here with POSIX_FADV_DONTNEED) gives the same bytes."""
    from blazil_ai.datasets.reader import _is_cached

    p = tmp_path / "cold.bin"
    data = np.random.default_rng(2).integers(0, 256, (3 << 20) + 5, dtype=np.uint8)
    with open(p, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    fd = os.open(p, os.O_RDONLY)
    try:
        probe = np.zeros(len(data), dtype=np.uint8)
        if _is_cached(fd, probe.data, len(data)):
            pytest.skip("this filesystem kept the pages despite POSIX_FADV_DONTNEED")
    finally:
        os.close(fd)
    assert np.array_equal(reader.read_file(p), data)
