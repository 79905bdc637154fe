"""Render a report.html in headless Chromium to a PNG: the page as a reader sees it, to look at.

    python benchmarks/screenshot_report.py RUN/report.html --out report.png [--width 1280] [--height 4000]

Needs Chromium (Debian: `apt-get install chromium`). The page is loaded from a file:// URL with
the network switched off, so an image that is not embedded in the HTML shows up as missing.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, out: Path, *, width: int = 1280, height: int = 4000, timeout: float = 120) -> Path:
    browser = find_browser()
    if browser is None:
        raise SystemExit(f"no Chromium found (looked for {', '.join(BROWSERS)}); on Debian: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state from other runs
        argv = [browser, "--headless", "--no-sandbox",  # --no-sandbox: Chromium refuses to run as root without it
                "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # nothing may load from a network
                f"--user-data-dir={profile}", f"--window-size={width},{height}",
                f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path, help="report.html, or the run directory holding it")
    p.add_argument("--out", type=Path, help="PNG to write (default: report.png beside the page)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=4000)
    args = p.parse_args(argv)
    page = args.page / "report.html" if args.page.is_dir() else args.page
    if not page.is_file():
        print(f"no report at {page}: run `imgcls report RUN` first", file=sys.stderr)
        return 1
    out = screenshot(page, args.out or page.with_name("report.png"), width=args.width, height=args.height)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
