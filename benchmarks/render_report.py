"""Render check: build a synthetic find-best report and screenshot it with headless Chromium.

Installs nothing. Chromium must be on PATH (Debian/Ubuntu: ``apt-get update && apt-get install -y chromium``).
The screenshot is checked for not being blank (a failed render is a uniform page) and its path printed so a
person can look at it.

    .venv/bin/python benchmarks/render_report.py [--out report_screenshot.png]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the synthetic project builder lives with the tests

from tests.evaluation.project import DATASET, make_project  # noqa: E402

from autoseg.evaluation import find_best  # noqa: E402

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(browser: str, html: Path, out: Path, profile: Path) -> None:
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--window-size=1200,3000", f"--screenshot={out}", html.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, timeout=120, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("report_screenshot.png"))
    args = parser.parse_args()
    browser = find_chromium()
    if browser is None:
        print("no Chromium on PATH; install it once with: apt-get update && apt-get install -y chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp) / "data", {"3d_fullres__unet": 0.45, "2d__unet": 0.55})
        result = find_best(DATASET, root=root, num_workers=2, print_summary=False)
        assert result.report is not None
        out = args.out.resolve()
        screenshot(browser, result.report, out, Path(tmp) / "profile")
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    spread = float(np.std(pixels[..., :3]))
    print(f"screenshot {out}: {pixels.shape[1]}x{pixels.shape[0]} px, pixel std {spread:.3f}")
    if spread < 0.02:
        print("the screenshot is (nearly) uniform: the report did not render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
