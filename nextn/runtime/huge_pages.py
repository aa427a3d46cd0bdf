"""Huge pages for the memory a pre-packing session allocates when it opens (ONNX Runtime's packed copies of the
weights, nextn's kernels' layouts), on Linux.

A decode step streams every weight once; over 4 KB pages the 1 GB checkpoint's fp32 step (476 MB) crosses
~116,000 pages, far more than the CPU's TLB holds, so each page costs a table walk. numpy already asks for huge
pages for its large arrays (nextn's own copies); ONNX Runtime's allocations do not, and the machine's
transparent huge pages are usually in `madvise` mode. So after the sessions open, each private anonymous mapping
that appeared meanwhile, is at least one huge page long and is mostly resident (RESIDENT of it: collapsing fills
a mapping's holes, so a sparse one would grow) is advised MADV_HUGEPAGE and collapsed at once (MADV_COLLAPSE,
Linux 6.1). The values are unchanged; only their pages are. Where the kernel refuses (older kernels, THP off)
nothing changes. Measured on issue 14's fp32 trunk (BENCHMARKS.md): 0.95x its time at one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <asm-generic/mman-common.h>
HUGE_PAGE = 2 << 20
RESIDENT = 0.9  # the share of a mapping that must be resident for it to be collapsed


@dataclass
class Collapsed:
    """What collapsing_new_memory did: bytes advised and collapsed, and mappings the kernel refused."""

    bytes: int = 0
    refused: int = 0
    mappings: list[tuple[int, int]] = field(default_factory=list)


def anonymous_mappings() -> dict[tuple[int, int], int]:
    """This process's private anonymous writable mappings (the heap included): (start, end) -> resident bytes.
    Empty where /proc/self/smaps cannot be read (not Linux)."""
    out: dict[tuple[int, int], int] = {}
    try:
        with open("/proc/self/smaps") as f:
            current = None
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    anonymous = len(head) == 5 or head[5] == "[heap]"
                    current = None
                    if head[1].startswith("rw") and head[1].endswith("p") and anonymous:
                        lo, hi = (int(x, 16) for x in head[0].split("-"))
                        current = (lo, hi)
                        out[current] = 0
                elif current is not None and head[0] == "Rss:":
                    out[current] = int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


@contextlib.contextmanager
def collapsing_new_memory():
    """Collapse into huge pages, after the body, the well-resident anonymous mappings it created (above).
    Yields a Collapsed that says what was done."""
    done = Collapsed()
    before = set(anonymous_mappings()) if sys.platform == "linux" else None
    yield done
    if before is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for (lo, hi), resident in anonymous_mappings().items():
        start, end = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
        if (lo, hi) in before or end - start < HUGE_PAGE or resident < RESIDENT * (hi - lo):
            continue
        if madvise(start, end - start, MADV_HUGEPAGE) == 0 and madvise(start, end - start, MADV_COLLAPSE) == 0:
            done.bytes += end - start
            done.mappings.append((start, end))
        else:
            done.refused += 1
    if done.bytes or done.refused:
        log.info("huge pages: %.0f MB of new mappings collapsed, %d refused", done.bytes / 1e6, done.refused)
