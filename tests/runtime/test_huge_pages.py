"""The sessions' new memory on huge pages (runtime/huge_pages.py): dense new mappings collapsed with their values
unchanged, sparse and older ones left alone."""

import ctypes
import mmap
import sys

import numpy as np
import pytest

from nextn.runtime import huge_pages

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="huge pages through /proc and madvise: Linux only")

SIZE = 8 << 20


def _private_mapping() -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def _huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= address < hi
        elif inside and head[0] == "AnonHugePages:":
            return int(head[1]) * 1024
    return 0


def _resident_pages(address: int) -> int:
    """Resident 4 KB pages of the SIZE bytes at `address` (mincore; the kernel may merge the mapping with its
    neighbours, so smaps' figures are not this mapping's alone)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vec = (ctypes.c_ubyte * (SIZE // mmap.PAGESIZE))()
    assert libc.mincore(address, SIZE, vec) == 0
    return sum(v & 1 for v in vec)


def _holds(done: huge_pages.Collapsed, address: int) -> bool:
    return any(lo <= address < hi for lo, hi in done.mappings)


def _collapses() -> bool:
    """Transparent huge pages not off, and MADV_COLLAPSE (Linux 6.1)."""
    import platform
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    release = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    return thp.is_file() and "[never]" not in thp.read_text() and release >= (6, 1)


@pytest.mark.skipif(not _collapses(), reason="transparent huge pages off, or a kernel before 6.1 (no MADV_COLLAPSE)")
def test_a_dense_new_mapping_is_collapsed_and_keeps_its_values():
    with huge_pages.collapsing_new_memory() as done:
        m, address = _private_mapping()
        values = np.frombuffer(m, np.uint32)
        values[:] = np.arange(values.size, dtype=np.uint32)  # every page resident
    assert done.bytes, done
    assert _holds(done, address + SIZE // 2) and _huge_bytes(address + SIZE // 2) >= 2 * huge_pages.HUGE_PAGE
    assert np.array_equal(values, np.arange(values.size, dtype=np.uint32))
    del values
    m.close()


def test_sparse_and_older_mappings_are_left_alone():
    older, older_address = _private_mapping()
    np.frombuffer(older, np.uint8)[:] = 1
    with huge_pages.collapsing_new_memory() as done:
        sparse, sparse_address = _private_mapping()
        np.frombuffer(sparse, np.uint8)[:: 2 * huge_pages.HUGE_PAGE] = 1  # two 4 KB pages of 2048 resident
    assert not _holds(done, sparse_address) and not _holds(done, older_address)
    assert _resident_pages(sparse_address) == 2  # not filled in
    sparse.close()
    older.close()
