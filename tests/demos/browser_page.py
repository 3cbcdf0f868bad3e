"""Headless Chromium for the demo tests (Selenium and chromium-driver: Debian packages that `make setup` installs), and
the page helpers they share: event-driven waits with a deadline, a page opened once its status line says connected."""

import re
import shutil
import time

import pytest

# what every demo test's Chromium runs with: headless, sound allowed to play without a click but muted
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--window-size=1400,1200",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
    "--disable-gpu",
    "--disable-extensions",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-sync",
)


def chrome(*extra_args: str):
    """A headless Chromium driver (the caller quits it); `extra_args` after CHROME_ARGS (e.g. a fake microphone)."""
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            pytest.fail(
                f"{exe} is missing: run `make setup` (it installs the Debian packages chromium and chromium-driver)"
            )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (*CHROME_ARGS, *extra_args):
        options.add_argument(arg)
    options.page_load_strategy = "eager"  # the page is ready when its status line says so (open_page)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(60)
    driver.set_page_load_timeout(100)
    return driver


def free_port() -> int:
    from omni.serve.cluster.process import free_port as _free_port

    return _free_port()


def wait(cond, timeout: float, what: str, every: float = 0.2):
    """Polls cond() until it returns something truthy; fails with `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def open_page(browser, url):
    """`browser` on `url`, once the page's status line says it connected to its server (or why not)."""
    from selenium.webdriver.common.by import By

    browser.get(url)
    wait(
        lambda: (
            browser.find_elements(By.ID, "status")
            and re.search("Connected|⚠️", browser.find_element(By.ID, "status").text)
        ),
        90,
        "the page to connect",
    )
    return browser


def el(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)
