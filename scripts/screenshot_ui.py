"""Take the README's screenshot of the web chat: a question and a located phrase, in headless Chromium.

Launches `belle-vl ui`'s app over the shipped demo model on a free loopback port, uploads
examples/pictures/shapes_and_word.png (enlarged, so the drawn boxes are easy to see), asks how many shapes there
are, locates "the red square", and saves the page to docs/ui-locate.png.

    python scripts/screenshot_ui.py [--out docs/ui-locate.png] [--chromium PATH] [--chromedriver PATH]

Needs the `ui` and `test` extras (gradio, selenium) and Chromium with its driver (Debian: chromium,
chromium-driver). Chinese labels need a font with Chinese glyphs (Debian: fonts-wqy-microhei or fonts-noto-cjk).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
PICTURE = ROOT / "examples" / "pictures" / "shapes_and_word.png"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui-locate.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver"))
    args = parser.parse_args()
    if not args.chromium or not args.chromedriver:
        parser.error("Chromium and chromedriver are needed: install them or pass --chromium and --chromedriver.")

    from belle_vl_tools import BelleVL
    from belle_vl_tools.ui import launch

    work = Path(tempfile.mkdtemp(prefix="belle-vl-screenshot-"))
    picture = work / "shapes_and_word.png"
    with Image.open(PICTURE) as original:
        original.resize((original.width * 4, original.height * 4), Image.Resampling.NEAREST).save(picture)

    port = _free_port()
    app = launch(BelleVL.from_pretrained(), host="127.0.0.1", port=port, block=False, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(options=options, service=Service(args.chromedriver))
    try:
        wait = WebDriverWait(driver, 120, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-input textarea"))

        def answers() -> list[str]:
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#belle-vl-chat [data-testid='bot']")]

        def idle() -> bool:
            trackers = driver.find_elements(By.CSS_SELECTOR, "#belle-vl-chat [data-testid='status-tracker']")
            return all("hide" in (t.get_attribute("class") or "").split() for t in trackers)

        driver.find_element(By.CSS_SELECTOR, "#chat-input input[type=file]").send_keys(str(picture))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-input .thumbnail-item"))
        driver.find_element(By.CSS_SELECTOR, "#chat-input textarea").send_keys(
            "How many shapes are there in the image?" + Keys.ENTER
        )
        wait.until(lambda d: len(answers()) == 1 and answers()[0].strip() not in ("", "…") and idle())
        driver.find_element(By.CSS_SELECTOR, "#locate-phrase textarea, #locate-phrase input").send_keys(
            "the red square"
        )
        driver.find_element(By.ID, "locate").click()
        wait.until(lambda d: len(answers()) > 1 and "Found" in answers()[-1] and idle())
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#located-image img"))
        # Show the whole page: the conversation at its end, the located picture and its boxes below.
        driver.execute_script(
            "document.querySelectorAll('#belle-vl-chat [role=log]').forEach(e => e.scrollTop = e.scrollHeight)"
        )
        for _ in range(3):  # the viewport is a little shorter than the window: grow until nothing is cut off
            height = driver.execute_script("return document.documentElement.scrollHeight")
            inner = driver.execute_script("return window.innerHeight")
            if inner >= height:
                break
            size = driver.get_window_size()
            driver.set_window_size(1400, min(size["height"] + height - inner + 8, 2400))
        WebDriverWait(driver, 5).until(lambda d: idle())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"Saved {args.out}: {answers()[-1]!r}")
    finally:
        driver.quit()
        app.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
