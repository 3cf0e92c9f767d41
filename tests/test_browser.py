"""The web view in a real browser: headless Chromium loads the page of ``emmae-stream --demo --http`` and
runs its script; the page's own status text must give the journal's count, and the overlay it shows
(and the screenshot of the page) must have the picks drawn.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped, with the reason, without it.
"""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from emmae.runtime.picking.bundle import default_bundle_path

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium; .ci/run installs it)"),
    pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model"),
]
DEMO_COUNT = 2
URL = re.compile(r"web view of .*?: (http://\S+?)/\s")


def chromium(*args: str, profile: Path, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Headless Chromium, as root in a container: no sandbox, no GPU, nothing fetched from outside."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--virtual-time-budget=8000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """``emmae-stream --demo --http 127.0.0.1:0``: picked, then serving its page until SIGTERM."""
    out = tmp_path_factory.mktemp("demo") / "picks"
    code = "import sys; from emmae.runtime.commands.stream import main; sys.exit(main(sys.argv[1:]))"
    child = subprocess.Popen([sys.executable, "-c", code, "--demo", "--demo-count", str(DEMO_COUNT), "--demo-per-hour", "36000",
                              "--out", str(out), "--http", "127.0.0.1:0", "--progress", "plain"],
                             stderr=subprocess.PIPE, text=True)
    base, log = None, []
    try:
        deadline = time.monotonic() + 240
        for line in child.stderr:
            log.append(line)
            found = URL.search(line)
            base = found.group(1) if found else base
            if "stays up" in line or time.monotonic() > deadline:
                break
        assert base is not None and any("stays up" in line for line in log), "".join(log)
        yield SimpleNamespace(base=base, out=out, child=child)
    finally:
        child.send_signal(signal.SIGTERM)
        rest = child.communicate(timeout=60)[1]
    assert child.returncode == 0, "".join(log) + rest


def picked_in_journal(out: Path) -> int:
    db = sqlite3.connect(f"file:{out / 'emmae-journal.sqlite'}?mode=ro&immutable=1", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM micrographs WHERE state = 'picked'").fetchone()[0]
    finally:
        db.close()


def pick_pixels(image: np.ndarray) -> int:
    """Pixels of the picks' circle colour (orange-yellow; anti-aliased and scaled by the browser)."""
    b, g, r = (image[..., i].astype(int) for i in range(3))
    return int(np.count_nonzero((r > 150) & (r - b > 90) & (g - b > 40)))


def test_the_page_shows_the_journal_count_and_the_picks_drawn(demo, tmp_path):
    done = chromium("--dump-dom", f"{demo.base}/", profile=tmp_path / "profile")
    dom = done.stdout
    assert 'data-ready="1"' in dom, done.stderr[-2000:]
    summary = re.search(r'<span id="summary" data-picked="(\d+)"[^>]*>([^<]*)</span>', dom)
    assert summary is not None, dom[:2000]
    picked = picked_in_journal(demo.out)
    assert picked == DEMO_COUNT
    assert int(summary.group(1)) == picked and unescape(summary.group(2)).startswith(f"{picked} picked, 0 failed")
    source = re.search(r'<img id="overlay"[^>]*src="([^"]+)"', dom) or re.search(r'src="([^"]+)"[^>]*id="overlay"', dom)
    assert source is not None and source.group(1).startswith("overlay.png?stem="), dom[:2000]
    with urllib.request.urlopen(f"{demo.base}/{unescape(source.group(1))}", timeout=10) as answer:
        overlay = cv2.imdecode(np.frombuffer(answer.read(), np.uint8), cv2.IMREAD_COLOR)
    assert overlay is not None and overlay.shape[:2] == (512, 512)
    assert pick_pixels(overlay) > 500  # dozens of circles

    shot = tmp_path / "page.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1000", f"{demo.base}/", profile=tmp_path / "profile")
    page = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert page is not None and page.shape[:2] == (1000, 1280)
    assert pick_pixels(page) > 300  # the picks are drawn on the page as shown
