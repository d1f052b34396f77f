"""Screenshot a run's report.html in headless Chromium, to check its layout by eye (plots, tables).

    python3 scripts/screenshot_report.py runs/NAME                    # writes runs/NAME/report.png
    python3 scripts/screenshot_report.py runs/NAME --out shot.png --width 1280 --height 4000

Needs a Chromium binary (`apt-get install -y chromium`, or set CHROMIUM=/path/to/chrome). The page is
self-contained (plots embedded), so the screenshot needs no server and no network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 3000, timeout_s: float = 120) -> Path:
    """Render `page` (an HTML file) to the PNG `out`; RuntimeError with Chromium's output if it fails."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError(f"no Chromium found ({', '.join(CANDIDATES)}); install it (apt-get install -y "
                           "chromium) or set CHROMIUM=/path/to/chrome")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no first-run state, no lock files
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{browser} exited {done.returncode} without writing {out}:\n{done.stderr[-2000:]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder holding report.html (or the HTML file itself)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN/report.png)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()
    page = args.run if args.run.is_file() else args.run / "report.html"
    if not page.exists():
        print(f"error: {page} does not exist; run `cudacnn report {args.run}` first", file=sys.stderr)
        return 2
    out = args.out or page.with_suffix(".png")
    try:
        screenshot(page, out, args.width, args.height)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
