"""Decode every image once into a uint8 N x S x S x 3 array, memory-mapped on disk.

The cache file is keyed by a fingerprint of the file list, sizes, modification times and the
resize settings, so later runs reuse it and any change to the data rebuilds it. Decoding runs in
worker processes on all cores (decode_all). This module does not import torch (its workers start fast).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from imgcls import tmpfiles
from imgcls.errors import UserError

CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit (about 9459 x 9459)


@dataclass
class Cache:
    images: np.ndarray  # uint8 [N, S, S, 3], memory-mapped, rows in the order of the paths given
    failed: dict[int, str]  # row -> why the file could not be read (its row is black)
    path: Path
    built: bool  # False when an existing cache was reused


class DecodeError(Exception):
    pass


# Image formats users meet that Pillow cannot decode: named, so the message says "convert it"
# rather than "not an image".
UNSUPPORTED_FORMATS = {".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL", ".svg": "SVG", ".dng": "DNG raw",
                       ".cr2": "Canon raw", ".nef": "Nikon raw", ".arw": "Sony raw"}


def decode(path: str | os.PathLike, size: int, resize: str = "squash") -> np.ndarray:
    """One file -> uint8 [size, size, 3] RGB, EXIF-rotated. Raises DecodeError saying why."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DecodeError(f"decompression-bomb sized image: {img.width}x{img.height} pixels is over "
                                      f"the {MAX_PIXELS:,}-pixel limit; downscale the file")
                # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: big photos decode several times faster.
                img.draft("RGB", (size, size))
                img = ImageOps.exif_transpose(img)
                img = to_rgb(img)
                img = _square(img, size, resize)
                return np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression-bomb sized image: {e} Downscale it below {MAX_PIXELS / 1e6:.1f} "
                          "Mpixel") from None
    except Image.UnidentifiedImageError:
        ext = path.suffix.lower()
        if ext in UNSUPPORTED_FORMATS:
            raise DecodeError(f"{UNSUPPORTED_FORMATS[ext]} images are not supported; convert it to JPEG or PNG") from None
        raise DecodeError(f"not an image: its content is not a format Pillow reads, despite the {ext or 'missing'} "
                          "extension") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"broken or truncated image: {e}") from None
    except Exception as e:  # a malformed file can trip any error inside a Pillow plugin; one file must not stop a run
        raise DecodeError(f"cannot decode ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16/32-bit greyscale is scaled, transparency composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit modes span 0..65535 even when this image is dark; 32-bit "I"/"F" carry no range, so guess.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _square(img: Image.Image, size: int, resize: str) -> Image.Image:
    if resize == "center_crop":
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR, reducing_gap=3.0)
        left, top = (w - size) // 2, (h - size) // 2
        return img.crop((left, top, left + size, top + size))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)


def fingerprint(paths: list[Path], *, size: int, resize: str) -> str:
    """sha256 of (name, bytes, mtime) of every file, in order, plus the resize settings."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{resize}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("IMGCLS_CACHE") or Path.home() / ".cache" / "imgcls")


def decode_rows(out: np.ndarray, paths: list[Path], start: int, size: int, resize: str) -> tuple[int, dict[int, str]]:
    """Decode `paths` into rows start.. of `out` (the memory-mapped cache); returns (count, row -> why failed)."""
    failed = {}
    for i, p in enumerate(paths):
        try:
            out[start + i] = decode(p, size, resize)
        except (DecodeError, OSError) as e:  # OSError: the file vanished or cannot be opened
            failed[start + i] = str(e) if isinstance(e, DecodeError) else f"cannot open: {e}"
    return len(paths), failed


def _allocate(path: Path, shape: tuple[int, ...], cache_dir: Path) -> None:
    """Create the .npy and reserve its disk space now. A memory-mapped file on a full disk would
    otherwise fail later with SIGBUS (a crash, no message) when a worker writes a page."""
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise
                # EOPNOTSUPP and the like: this filesystem cannot reserve space; build without it
    except OSError as e:
        path.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"Not enough disk space for the image cache ({int(np.prod(shape)) / 1e6:,.1f} MB) in "
                            f"{cache_dir}. Free space there, or set cache_dir= (or $IMGCLS_CACHE) to a disk with "
                            "room; a smaller cache_size= (or image_size=) also shrinks it.") from None
        raise


def decode_all(file: Path, paths: list[Path], *, size: int, resize: str, workers: int, chunk: int,
               done: Callable[[int], object] = lambda n: None) -> dict[int, str]:
    """Decode every path into the memory-mapped .npy `file` with `workers` processes, `chunk` files a task;
    returns row -> why that file failed. A worker is `python -m imgcls.cache FILE SIZE RESIZE`, fed tasks on
    its standard input: unlike a multiprocessing pool it never imports the user's script (a spawned
    process re-ran a script without an `if __name__ == "__main__":` guard, which started imgcls again,
    without end), and one that dies stops the build at once with its last error lines. Processes, not
    threads: on 2 cores threads decoded food-10 as fast but tiny-imagenet's 64 px JPEGs 1.7x slower
    (Python's per-image work holds the GIL; benchmarks/decode_pool.py)."""
    tasks = queue.SimpleQueue()
    for i in range(0, len(paths), chunk):
        tasks.put((i, paths[i:i + chunk]))
    failed: dict[int, str] = {}

    def feed_one_worker() -> None:
        argv = [sys.executable, "-m", "imgcls.cache", str(file), str(size), resize]
        with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"}) as worker:  # stderr to a file: a full pipe would block it
            for start, part in iter(lambda: tasks.get() if not tasks.empty() else None, None):
                reply = ""
                with contextlib.suppress(BrokenPipeError):
                    worker.stdin.write(json.dumps({"start": start, "paths": [str(p) for p in part]}) + "\n")
                    worker.stdin.flush()
                    reply = worker.stdout.readline()
                if not reply:
                    worker.kill()
                    with contextlib.suppress(OSError):  # what was written to the dead worker cannot be flushed
                        worker.stdin.close()
                    errors.seek(0)
                    why = errors.read().strip().splitlines()[-3:]
                    raise UserError(f"An image-decoding worker process died (exit status {worker.wait()}): "
                                    f"{' / '.join(why) or 'no message'}. decode_workers=1 decodes in this process "
                                    "instead (slower, but without worker processes).")
                result = json.loads(reply)
                failed.update({int(k): v for k, v in result["failed"].items()})
                done(result["n"])
            worker.stdin.close()

    if workers == 1 or len(paths) <= chunk:  # one task: no worker to start
        with _memmap(file) as out:
            for start in range(0, len(paths), chunk):
                n, f = decode_rows(out, paths[start:start + chunk], start, size, resize)
                failed.update(f)
                done(n)
        return failed
    with ThreadPoolExecutor(workers, thread_name_prefix="imgcls-decode") as pool:  # one feeding thread per worker
        try:
            for future in as_completed([pool.submit(feed_one_worker) for _ in range(workers)]):
                future.result()  # a dead worker's error, at once
        except BaseException:  # Ctrl-C or a dead worker: the others stop after their current task
            while not tasks.empty():
                tasks.get()
            raise
    return failed


@contextlib.contextmanager
def _memmap(file: Path):
    out = np.load(file, mmap_mode="r+")
    try:
        yield out
    finally:
        out.flush()
        del out


def _worker() -> None:
    """`python -m imgcls.cache FILE SIZE RESIZE`: decode the tasks read from standard input (one JSON line
    each: start row and paths) into FILE, replying with one JSON line each (count, row -> why failed)."""
    file, size, resize = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with _memmap(file) as out:
        for line in sys.stdin:
            task = json.loads(line)
            n, f = decode_rows(out, [Path(p) for p in task["paths"]], task["start"], size, resize)
            out.flush()
            sys.stdout.write(json.dumps({"n": n, "failed": {str(k): v for k, v in f.items()}}) + "\n")
            sys.stdout.flush()


def build(paths: list[Path], *, size: int, resize: str = "squash", cache_dir: str | Path = "",
          workers: int = 0, progress: bool = True, name: str = "images") -> Cache:
    """Return the cache for these files, building it (in parallel) unless a matching one exists."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(paths, size=size, resize=resize)
    file = cache_dir / f"{name}-{size}px-{fp[:20]}.npy"
    meta_file = file.with_suffix(".json")
    if file.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            images = np.load(file, mmap_mode="r")
            if images.shape == (len(paths), size, size, 3):
                return Cache(images, {int(k): v for k, v in meta["failed"].items()}, file, built=False)
        except (ValueError, KeyError, OSError):  # damaged by a crash or a full disk: build it again
            pass

    tmpfiles.remove_stale(cache_dir)  # caches a killed build left half-written
    tmp = tmpfiles.temp_path(file, ".tmp.npy")
    _allocate(tmp, (len(paths), size, size, 3), cache_dir)
    workers = workers or os.cpu_count() or 1
    chunk = max(16, min(512, len(paths) // (workers * 8) + 1))
    from tqdm.auto import tqdm  # progress display only
    bar = tqdm(total=len(paths), desc=f"decoding {name} at {size}px", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        failed = decode_all(tmp, paths, size=size, resize=resize, workers=workers, chunk=chunk, done=bar.update)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    tmpfiles.write_text(meta_file, json.dumps({"version": CACHE_VERSION, "size": size, "resize": resize,
                                               "count": len(paths),
                                               "failed": {str(k): v for k, v in sorted(failed.items())}}))
    os.replace(tmp, file)  # atomic, and last: a half-built cache is never mistaken for a whole one
    return Cache(np.load(file, mmap_mode="r"), failed, file, built=True)


if __name__ == "__main__":
    _worker()
