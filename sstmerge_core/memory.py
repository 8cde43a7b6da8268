"""Resident memory of this process, and giving freed heap memory back to the system between models.

glibc serves the many mid-sized blocks of an evaluation (KV caches that grow token by token, logits, activations)
from its heap and raises its mmap threshold after each large free, so memory freed by one evaluated model stays
resident and the next model's differently shaped blocks are placed beside it: the resident size creeps up model by
model although nothing is kept. `release_freed_memory` calls `malloc_trim(0)`, which returns the free pages of every
arena; elsewhere (no glibc) it does nothing. `SSTMERGE_MALLOC_TRIM=0` turns it off, for benchmarks that measure
what it saves (bench/peak_memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc `malloc_trim(0)`); a no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None and os.environ.get("SSTMERGE_MALLOC_TRIM", "1") != "0":
        trim(0)
