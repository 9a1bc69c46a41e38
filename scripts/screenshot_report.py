#!/usr/bin/env python3
"""Screenshot a medvae review page with headless Chromium.

    python scripts/screenshot_report.py REPORT_DIR OUT_PNG [--width 1600] [--height 1150]

REPORT_DIR is a folder written by ``medvae evaluate --report`` (it holds ``index.html``); OUT_PNG is
the PNG to write (for example ``docs/review_page.png``). Uses Debian's ``/usr/bin/chromium`` (or
``$CHROMIUM``) with a throw-away profile and every background network feature off; the page itself is
self-contained and makes no requests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
    "--hide-scrollbars", "--mute-audio",
]


def find_chromium() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    return None


def screenshot(html: Path, out_png: Path, *, width: int = 1600, height: int = 1150, timeout: float = 120,
               preset: str | None = None, slice_number: int | None = None) -> Path:
    """Render ``html`` (file://) and save a ``width`` × ``height`` screenshot to ``out_png``.

    ``preset`` (e.g. ``brain``) and ``slice_number`` (1-based) open the page at that display window
    and slice (the page reads them from the URL fragment)."""
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("screenshot_report: chromium not found (apt-get install chromium)")
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"preset={preset}"] * bool(preset) + [f"slice={slice_number}"] * bool(slice_number)
    fragment = "#" + "&".join(parts) if parts else ""
    with tempfile.TemporaryDirectory(prefix="medvae-chromium-") as profile:
        # into the profile folder first: a failed run left an earlier screenshot in place, reported as new
        shot = Path(profile) / "screenshot.png"
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               "--virtual-time-budget=5000", f"--screenshot={shot}", Path(html).resolve().as_uri() + fragment]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if not shot.is_file() or shot.stat().st_size == 0:
            raise SystemExit(f"screenshot_report: chromium wrote no screenshot (exit {proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}")
        shutil.move(shot, out_png)
    return out_png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir", type=Path, help="folder with index.html (medvae evaluate --report DIR)")
    ap.add_argument("out_png", type=Path, help="PNG to write")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1150)
    ap.add_argument("--preset", default=None, help="display window preset to open with (e.g. brain, lung)")
    ap.add_argument("--slice", type=int, default=None, help="slice to open at (1-based, as the page numbers them)")
    args = ap.parse_args(argv)
    html = args.report_dir / "index.html"
    if not html.is_file():
        print(f"screenshot_report: {html}: no index.html here", file=sys.stderr)
        return 2
    print(screenshot(html, args.out_png, width=args.width, height=args.height, preset=args.preset,
                     slice_number=args.slice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
