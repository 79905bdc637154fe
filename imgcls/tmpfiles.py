"""Every file imgcls writes is written atomically here (a temp file beside the target, fsync, rename:
checkpoints, run files, submissions, the cache's index), and the temp files a killed process left
behind are cleaned up.

A temp file is named `.<target name>.<host>~<pid>.tmp` (`.tmp.npy` for the cache): a run that owns
the folder later removes the ones whose process is gone (this host, no such pid), never those of a
live process or of another machine sharing the disk (a pid there means nothing here). A kill during
the cache build left 169 MB per try for tiny-imagenet at 32 px before (issue 16).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from imgcls.errors import UserError

# `.<name>.<host>~<pid>.tmp`, or `.<name>.<pid>.tmp` as imgcls wrote them before it recorded the host.
PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:(?P<host>[\w-]+)~)?(?P<pid>\d+)\.tmp(?:\.npy)?$")


def _host() -> str:
    return re.sub(r"[^\w-]", "-", socket.gethostname()) or "host"


def temp_path(path: Path, suffix: str = ".tmp") -> Path:
    """Where to write `path` before renaming it into place."""
    return path.with_name(f".{path.name}.{_host()}~{os.getpid()}{suffix}")


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this host; a zombie (killed, its parent not yet told) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): alive, as os.kill said
        return True


def remove_stale(folder: Path) -> list[Path]:
    """Delete the temp files in `folder` whose writer has died on this host; returns them. A name
    without a host is from an imgcls that did not record one: this host's."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    host = _host()
    for p in Path(folder).iterdir():
        m = PATTERN.match(p.name)
        if not m or not p.is_file() or (m["host"] or host) != host or alive(int(m["pid"])):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:  # another run cleaned it first
            pass
    return removed


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named `<prefix><host>~<pid>-...` in the system's temp folder, so that one a killed
    process left behind (SIGTERM, kill -9: its `finally` never ran) is removed by remove_stale_dirs."""
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{_host()}~{os.getpid()}-")


def remove_stale_dirs(prefix: str) -> list[Path]:
    """Delete the temp_dir(prefix) folders whose process has died on this host; returns them."""
    pattern = re.compile(rf"^{re.escape(prefix)}(?P<host>[\w-]+)~(?P<pid>\d+)-")
    removed = []
    for p in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        m = pattern.match(p.name)
        if m and p.is_dir() and m["host"] == _host() and not alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, rename. The bytes are made in memory first and
    written here by Python, so a full disk is an OSError (ENOSPC): torch.save straight to a path reports
    it as an opaque RuntimeError ("unexpected pos"), and safetensors' save_file may not report it at all."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a VM or container killed hard keeps a whole file
        os.replace(tmp, path)  # a reader never sees half a file, and a crash keeps the previous one
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"The disk is full while writing {path}. Free space there, or write the run "
                            "to a disk with room (--out).") from None
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())
