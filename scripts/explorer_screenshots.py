"""README screenshots of the attention explorer, taken in headless chromium (Debian's chromium + chromium-driver).

    python -m scripts.explorer_screenshots                  # docs/figures/explorer_minilm.png, explorer_enfr.png

all-MiniLM-L6-v2 on the README's pizza sentence, layer 3 head 12; the translation model runs/enfr-cpu/final on
the first verse pair of the en-fr test split (books never seen in training), cross-attention.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from course_transformer.explorer.app import build_app


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver(window: str = "1400,1700") -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait(browser, css: str, needle: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        elements = browser.find_elements(By.CSS_SELECTOR, css)
        if elements and needle in elements[0].text:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{css} never showed {needle!r}")


def set_number(browser, elem_id: str, value: int) -> None:
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)


def shoot(model: str, path: Path, layer: int, head: int, held_out: bool) -> None:
    port = free_port()
    app = build_app(model)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    browser = driver()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait(browser, "#status", "Done")
        if held_out:
            browser.find_element(By.CSS_SELECTOR, "#heldout").click()
            time.sleep(2)
            browser.find_element(By.CSS_SELECTOR, "#run").click()
            time.sleep(1)
            wait(browser, "#status", "Done")
            browser.find_element(By.XPATH, "//*[@id='view']//label[contains(., 'cross')]").click()
        set_number(browser, "layer", layer)
        set_number(browser, "head", head)
        time.sleep(4)  # the figures re-render
        path.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(path))
        print(f"wrote {path}")
    finally:
        browser.quit()
        app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("docs/figures"))
    parser.add_argument("--translation", default="runs/enfr-cpu/final", help="the translation model folder")
    args = parser.parse_args(argv)
    shoot("bert-minilm", args.output_dir / "explorer_minilm.png", layer=3, head=12, held_out=False)
    if (Path(args.translation) / "config.json").is_file():
        shoot(args.translation, args.output_dir / "explorer_enfr.png", layer=2, head=1, held_out=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
