"""A real browser for the tests of pages: Debian's headless Chromium, driven through
chromium-driver by Selenium (``make browser`` installs both; ``make test`` does it first).

``chrome()`` starts one browser; it is skipped with the command to run where the browser
or Selenium is missing (a developer machine without root), so the rest of the suite runs.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--window-size=1280,1600",
)


@contextlib.contextmanager
def chrome(*extra_flags: str) -> Iterator[Any]:
    """A headless Chromium WebDriver (quit on exit), with its own throwaway profile."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("no browser: run `make browser` (Debian's chromium and chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    with tempfile.TemporaryDirectory(prefix="fedlift-chrome-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}", *extra_flags):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def full_screenshot(driver: Any, path: Path) -> bytes:
    """A PNG of the whole page (not just the window), written to ``path``; returns it."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    png = base64.b64decode(shot["data"])
    path.write_bytes(png)
    return png


def non_blank(png: bytes) -> bool:
    """Whether a PNG shows something: more than one colour, and not mostly one."""
    import io

    from matplotlib import image

    pixels = image.imread(io.BytesIO(png), format="png")
    flat = pixels.reshape(-1, pixels.shape[-1])
    if len(flat) == 0:
        return False
    import numpy as np

    colours, counts = np.unique((flat * 255).astype(np.uint8), axis=0, return_counts=True)
    return len(colours) > 16 and counts.max() / counts.sum() < 0.995
