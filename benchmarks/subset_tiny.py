"""Cut a subset of tiny-imagenet-100 small enough to travel with the tree to a lent GPU (issue 34).

    python benchmarks/subset_tiny.py SOURCE OUT [--classes 60] [--per-class 500] [--test 3000]

SOURCE is the extracted tiny-imagenet-100 folder or its tarball (tiny-imagenet-100.tar.gz, read as a
stream, nothing extracted). Kept: the first --classes lines of wnids.txt in file order (label = line
index, as in the full set), the training images <wnid>_<n>.JPEG with n < --per-class of each, and the
test images test_<k>.JPEG with k < --test. Test labels are not distributed, so the test slice is a fixed
slice of the shuffled test set: it holds images of all 100 classes, and only its row count and ids can
be checked. wnids.txt, words.txt and submission_sample.csv (the source template's rows for the kept
images, in its own order) are written to match; *_boxes.txt are left out (imgcls ignores them).
SUBSET.txt says in one line what was kept; benchmarks/device_run.sh prints it with its figures.

OUT ending in .tar.gz is one gzip tarball holding a single folder named like it (what `carry` takes
to the device machine: one file, its size exact, whatever the file system's block size); anything
else is that folder. Both are reproducible byte for byte from the same source and arguments.
Prints the classes, images and size kept. The default (60 classes: 30,000 training and 3,000 test
images, about 45 MB) leaves room under the 64 MiB that travels for the kornia wheels (7 MB) and the
tree; --max-mib makes a larger cut an error.
"""
from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TRAIN = re.compile(r"train/(?P<wnid>[^/]+)/images/(?P=wnid)_(?P<n>\d+)\.JPEG$")
TEST = re.compile(r"test/images/test_(?P<k>\d+)\.JPEG$")
TEXT_FILES = ("wnids.txt", "words.txt", "submission_sample.csv")


@dataclass(frozen=True)
class Cut:
    classes: int
    total_classes: int
    train: int
    test: int
    out: Path
    bytes: int
    note: str  # SUBSET.txt's line


class Source:
    """The files of a tiny-imagenet-100 folder or tarball, by path relative to its top folder."""

    def __init__(self, path: Path):
        self.path = path
        self.is_tar = path.is_file()
        if not (self.is_tar or (path / "wnids.txt").is_file()):
            raise SystemExit(f"{path}: give the tiny-imagenet-100 folder (with wnids.txt) or its .tar.gz")

    def texts(self) -> dict[str, str]:
        """wnids.txt, words.txt, submission_sample.csv (a tarball: one pass; wnids.txt comes last in it)."""
        if not self.is_tar:
            return {name: (self.path / name).read_text(encoding="utf-8-sig") for name in TEXT_FILES}
        found = {}
        with tarfile.open(self.path, "r:gz") as tar:
            for member in tar:
                name = member.name.split("/", 1)[-1]
                if name in TEXT_FILES:
                    found[name] = tar.extractfile(member).read().decode("utf-8-sig")
        missing = [n for n in TEXT_FILES if n not in found]
        if missing:
            raise SystemExit(f"{self.path} holds no {', '.join(missing)}: is it tiny-imagenet-100.tar.gz?")
        return found

    def images(self, keep) -> Iterator[tuple[str, bytes]]:
        """(relative path, bytes) of every image for which keep(relative path) is true."""
        if self.is_tar:
            with tarfile.open(self.path, "r:gz") as tar:
                for member in tar:
                    name = member.name.split("/", 1)[-1]
                    if member.isfile() and keep(name):
                        yield name, tar.extractfile(member).read()
            return
        for p in sorted(self.path.rglob("*.JPEG")):
            name = p.relative_to(self.path).as_posix()
            if keep(name):
                yield name, p.read_bytes()


class Writer:
    """Files into a folder, or into a reproducible .tar.gz (fixed mtimes, owners and gzip header)."""

    def __init__(self, out: Path):
        self.out, self.top = out, out.name.removesuffix(".tar.gz")
        if out.exists():
            raise SystemExit(f"{out} exists: remove it first")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.name.endswith(".tar.gz"):
            self.gz = gzip.GzipFile(out, "wb", compresslevel=6, mtime=0)
            self.tar = tarfile.open(fileobj=self.gz, mode="w", format=tarfile.USTAR_FORMAT)
        else:
            self.tar = None
        self.files = 0

    def add(self, name: str, data: bytes) -> None:
        self.files += 1
        if self.tar is None:
            path = self.out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return
        info = tarfile.TarInfo(f"{self.top}/{name}")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> int:
        """Bytes written (the tarball's, or the sum of the folder's files)."""
        if self.tar is not None:
            self.tar.close()
            self.gz.close()
            return self.out.stat().st_size
        return sum(p.stat().st_size for p in self.out.rglob("*") if p.is_file())


def cut(source: Path, out: Path, *, classes: int = 60, per_class: int = 500, test: int = 3000) -> Cut:
    src = Source(source)
    texts = src.texts()
    wnids = texts["wnids.txt"].split()
    if not 1 <= classes <= len(wnids):
        raise SystemExit(f"--classes {classes}: {source} has {len(wnids)} classes in wnids.txt")
    kept = wnids[:classes]
    kept_set = set(kept)

    def keep(name: str) -> bool:
        m = TRAIN.match(name)
        if m:
            return m["wnid"] in kept_set and int(m["n"]) < per_class
        m = TEST.match(name)
        return bool(m) and int(m["k"]) < test

    writer = Writer(out)
    train_counts = dict.fromkeys(kept, 0)
    test_ids = set()
    for name, data in src.images(keep):
        writer.add(name, data)
        m = TRAIN.match(name)
        if m:
            train_counts[m["wnid"]] += 1
        else:
            test_ids.add(name.rsplit("/", 1)[1])
    empty = [w for w, n in train_counts.items() if n == 0]
    if empty:
        raise SystemExit(f"{source}: no training images for {', '.join(empty)}")

    header, *rows = texts["submission_sample.csv"].splitlines()
    rows = [r for r in rows if r.split(",", 1)[0].strip() in test_ids]
    if len(rows) != len(test_ids):
        raise SystemExit(f"{source}/submission_sample.csv names {len(rows)} of the {len(test_ids)} test images kept")
    words = [line for line in texts["words.txt"].splitlines() if line.split("\t", 1)[0] in kept_set]
    train = sum(train_counts.values())
    note = (f"tiny-imagenet-100 subset: the first {classes} of {len(wnids)} classes (wnids.txt order), "
            f"{train} training images ({min(train_counts.values())}-{max(train_counts.values())} per class), "
            f"test_0..test_{test - 1} ({len(test_ids)} test images, labels unknown, from all {len(wnids)} classes)")
    for name, text in (("wnids.txt", "".join(w + "\n" for w in kept)), ("words.txt", "".join(w + "\n" for w in words)),
                       ("submission_sample.csv", "\n".join([header, *rows]) + "\n"), ("SUBSET.txt", note + "\n")):
        writer.add(name, text.encode())
    return Cut(classes, len(wnids), train, len(test_ids), out, writer.close(), note)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="tiny-imagenet-100 folder or tiny-imagenet-100.tar.gz")
    p.add_argument("out", type=Path, help="OUT.tar.gz (one file holding the folder OUT/) or a folder")
    p.add_argument("--classes", type=int, default=60, help="the first N classes of wnids.txt (default 60)")
    p.add_argument("--per-class", type=int, default=500, help="training images per class, n < N (default 500: all)")
    p.add_argument("--test", type=int, default=3000, help="test images test_0..test_{N-1} (default 3000)")
    p.add_argument("--max-mib", type=float, default=0, help="fail when the cut is larger (0: no limit)")
    args = p.parse_args(argv)
    c = cut(args.source, args.out, classes=args.classes, per_class=args.per_class, test=args.test)
    print(c.note)
    print(f"wrote {c.out}: {c.classes} classes, {c.train} training + {c.test} test images, "
          f"{c.bytes / 1e6:.1f} MB = {c.bytes / 2 ** 20:.1f} MiB")
    if args.max_mib and c.bytes > args.max_mib * 2 ** 20:
        print(f"error: {c.bytes / 2 ** 20:.1f} MiB is over --max-mib {args.max_mib:g}: cut fewer --classes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
