"""A real browser for the report tests: headless Debian Chromium driven by Selenium (chromedriver from the same
Debian packages), and a screenshot helper that the README's picture of report.html is taken with.

    python -m tests.helpers.browser runs/demo/merge/report.html docs/report.png
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH = 1280


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file() and shutil.which(Path(path).name) is None:
            return f"{path} is not installed (Debian packages chromium, chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(width: int = WIDTH, height: int = 1000) -> Iterator:
    """A headless Chromium session with the browser console log recorded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else str(shutil.which("chromium"))
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else str(shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def full_page(driver, width: int = WIDTH) -> bytes:
    """A PNG of the whole page: the window resized to the document's height first."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, int(height) + 120)
    return driver.get_screenshot_as_png()


def screenshot(html: Path, out: Path, colours: int | None = 256) -> Path:
    """Open `html` in headless Chromium and save a full-page screenshot to `out` (reduced to `colours` colours, to
    keep a committed picture small; None keeps every colour)."""
    import io

    from PIL import Image

    with chromium() as driver:
        driver.get(html.resolve().as_uri())
        png = full_page(driver)
    if colours is None:
        out.write_bytes(png)
    else:
        Image.open(io.BytesIO(png)).convert("RGB").quantize(colours).save(out, optimize=True)
    return out


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
