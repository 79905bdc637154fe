"""Settings of a training process, applied the same way from the command line and from Python (run.run
calls tune()): glibc's allocator, and how many CPU threads torch uses (ThreadTuner). No torch import at
module level, so the command line can call it before it knows whether the command needs torch."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time


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
    """Everything a training process sets for itself before it starts; idempotent."""
    keep_freed_memory()


@contextlib.contextmanager
def cpu_threads(setting, *, device: str, deterministic: bool):
    """torch's CPU threads for one run: a number (threads=N) for the run, or with threads=auto on the CPU a
    ThreadTuner (yielded; None otherwise) that the loop feeds. OMP_NUM_THREADS set by the user counts as
    a number. The process's count is restored afterwards (a notebook trains again with its own)."""
    import torch

    before = torch.get_num_threads()
    if setting == "auto" and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        setting = int(os.environ["OMP_NUM_THREADS"])
    if setting != "auto":
        torch.set_num_threads(int(setting))
    try:
        yield ThreadTuner() if setting == "auto" and device == "cpu" and not deterministic else None
    finally:
        torch.set_num_threads(before)


class ThreadTuner:
    """threads=auto on the CPU: as many torch threads as the cores this process actually gets.

    Why: torch's OpenMP team waits at the end of every parallel region for its slowest thread. Beside one
    busy process on 2 cores, one of torch's 2 threads is often descheduled, and the whole team waits for
    it: the default recipe at 128 px ran 108.7 img/s alone and 34.7 beside a plain CPU burner, where one
    thread ran 59.0 (2-core EPYC; two trainings side by side: 8-11 img/s each). OMP_WAIT_POLICY=PASSIVE
    (23.7) and GOMP_SPINCOUNT=1000 (24.1) made it worse (benchmarks/contention.py).
    How busy the machine is cannot be read reliably (a container's /proc/stat shows the host), so the
    tuner watches its own process: over each window of training, the CPU time the process got per second
    of wall time. Alone, `threads` busy threads get about `threads` cores; when they get half a core
    less, another process holds one, so it tries one thread fewer. From fewer threads than cores it tries
    one more now and then (after 60 s, then backing off to 300 s while the tries fail). A try is kept
    only when its images/s are 10% higher than before it. Not used with deterministic=true (the thread
    count changes the floating-point summation order)."""

    WINDOW = 3.0  # seconds of training steps per measurement
    FIRST_TRY, MAX_WAIT = 60.0, 300.0  # seconds before trying one thread more, doubling after each failed try
    BETTER, STARVED = 1.10, 0.5  # keep a try this much faster; cores short of `threads` that mean contention

    def __init__(self, cores: int | None = None):
        import torch

        self.torch = torch
        self.cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self.threads = torch.get_num_threads()
        self.rates: dict[int, float] = {}  # threads -> images/s of the last window at that count
        self.trying: int | None = None  # the count before a try (to go back to), while one runs
        self.wait, self.next_try = self.FIRST_TRY, time.monotonic() + self.FIRST_TRY
        self.images = self.seconds = 0.0
        self.since = (time.monotonic(), _cpu_seconds())
        self.log: list[tuple[float, int, float, float]] = []  # (time, threads, images/s, cores got): for the benchmark

    def observe(self, images: int, seconds: float) -> None:
        """After a training step: its images and seconds. At the end of a window, keeps or changes torch's
        thread count as the measurements say."""
        self.images, self.seconds = self.images + images, self.seconds + seconds
        if self.seconds < self.WINDOW:
            return
        now, cpu = time.monotonic(), _cpu_seconds()
        rate, got = self.images / self.seconds, (cpu - self.since[1]) / max(1e-9, now - self.since[0])
        self.images = self.seconds = 0.0
        self.since = (now, cpu)
        self.rates[self.threads] = rate
        self.log.append((now, self.threads, rate, got))
        if self.trying is not None:  # a try has run one window: keep it, or go back
            if rate > self.BETTER * self.rates.get(self.trying, 0.0):
                self.wait = self.FIRST_TRY
            else:
                self._set(self.trying)
                self.wait = min(self.MAX_WAIT, 2 * self.wait)
            self.trying, self.next_try = None, now + self.wait
        elif self.threads > 1 and got < self.threads - self.STARVED:
            self._try(self.threads - 1)  # another process holds a core
        elif self.threads < self.cores and now >= self.next_try:
            self._try(self.threads + 1)  # it may have ended

    def _try(self, threads: int) -> None:
        self.trying = self.threads
        self._set(threads)

    def _set(self, threads: int) -> None:
        self.torch.set_num_threads(threads)
        self.threads = threads


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads), user and system."""
    t = os.times()
    return t.user + t.system
