"""Settings of a training process, applied the same way from the command line and from Python (run.run
calls tune()): glibc's allocator. No torch import, so the command line can call it before it knows
whether the command needs torch."""
from __future__ import annotations

import ctypes
import sys


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the
    OS; True if it took the settings (Linux with glibc). The process's memory then stays at its peak.

    On the CPU every step allocates the same large tensors again (the augmented batch, activations,
    gradients). By default glibc serves each one above 32 MiB (and, as its threshold moves, many
    smaller ones) from a fresh mmap, and the first write to each 4 KiB page of it is a page fault:
    converting a 25 MB uint8 batch to float took 14.3 ms that way against 2.1 ms in reused memory,
    and the augmented-batch pipeline ran 5.2k -> 8.3k images/s (one thread; 2-core AMD EPYC VM,
    2026-11-29). PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for the same reason; this
    needs no preloaded library. Called by the command line and the benchmarks, never on import."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def tune() -> None:
    """Everything a training process sets for itself; idempotent."""
    keep_freed_memory()
