"""Decoding the image cache, three ways side by side in one invocation, alternating, over a fresh output
file each time: the spawn multiprocessing pool imgcls used before issue 33 (each worker opened the
memory-mapped cache and decoded its chunks; a user's script without a __main__ guard made it respawn
without end), the worker processes it uses now (imgcls/cache.py's decode_all: `python -m imgcls.cache`
fed on its standard input, never importing the user's script), and threads (the simpler way the
issue asked to measure).

    flock -x /tmp/imgcls.lock python benchmarks/decode_pool.py /work/data/food-10 --size 128 --repeats 3
    flock -x /tmp/imgcls.lock python benchmarks/decode_pool.py /work/data/tiny-imagenet-100 --size 64

Prints each way's seconds (min / median / max over --repeats) and images/s, and the ratio of the medians.
The process pool's time includes starting its workers, as a cache build paid it.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls import cache, data, layouts  # noqa: E402


def _process_rows(args) -> tuple[int, dict[int, str]]:
    """The process pool's worker, as imgcls had it: open the memory-mapped file, decode, flush."""
    file, paths, start, size, resize = args
    out = np.load(file, mmap_mode="r+")
    result = cache.decode_rows(out, paths, start, size, resize)
    out.flush()
    return result


def with_processes(file: Path, paths: list[Path], *, size: int, resize: str, workers: int, chunk: int) -> None:
    jobs = [(file, paths[i:i + chunk], i, size, resize) for i in range(0, len(paths), chunk)]
    with mp.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap_unordered(_process_rows, jobs):
            pass


def with_workers(file: Path, paths: list[Path], *, size: int, resize: str, workers: int, chunk: int) -> None:
    cache.decode_all(file, paths, size=size, resize=resize, workers=workers, chunk=chunk)


def with_threads(file: Path, paths: list[Path], *, size: int, resize: str, workers: int, chunk: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    out = np.load(file, mmap_mode="r+")
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda i: cache.decode_rows(out, paths[i:i + chunk], i, size, resize),
                      range(0, len(paths), chunk)))
    out.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a dataset folder imgcls reads")
    p.add_argument("--size", type=int, default=128, help="cache side in px")
    p.add_argument("--resize", default="center_crop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="0 = all cores, as imgcls")
    args = p.parse_args()
    samples, _ = data.flatten(layouts.read(args.data))
    paths = [s.path for s in samples]
    workers = args.workers or os.cpu_count() or 1
    chunk = max(16, min(512, len(paths) // (workers * 8) + 1))  # cache.build's chunking
    for p_ in paths:  # every file read once, so both ways find them in the page cache
        p_.read_bytes()
    ways = {"spawn pool (before)": with_processes, "workers (now)": with_workers, "threads": with_threads}
    times: dict[str, list[float]] = {k: [] for k in ways}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.repeats):
            for name, way in ways.items():
                file = Path(work) / f"cache-{r}-{len(times[name])}.npy"
                np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=(len(paths), args.size, args.size, 3))
                t0 = time.perf_counter()
                way(file, paths, size=args.size, resize=args.resize, workers=workers, chunk=chunk)
                times[name].append(time.perf_counter() - t0)
                file.unlink()
    print(f"{args.data}: {len(paths)} images -> {args.size} px ({args.resize}), {workers} workers, chunks of {chunk}, "
          f"{os.cpu_count()} cores, {args.repeats} repeats")
    for name, t in times.items():
        print(f"  {name:20s} min {min(t):6.2f} s  median {statistics.median(t):6.2f} s  max {max(t):6.2f} s  "
              f"{len(paths) / statistics.median(t):7.0f} img/s")
    a, b, c = (statistics.median(times[k]) for k in ways)
    print(f"  median seconds against the spawn pool: workers {b / a:.2f}, threads {c / a:.2f}")


if __name__ == "__main__":
    main()
