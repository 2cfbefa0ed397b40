"""The live page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

A real name server, model server and ticker on 127.0.0.1, the gateway as its own process (so it
can be stopped and started again under the open page), ``remote-mvc-ctl`` as a subprocess.
Screenshots (phone-sized and desktop) are saved under ``build/test-artifacts`` (or
``$TEST_ARTIFACTS``). Without chromium/chromedriver the tests skip, except under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from remote_mvc.testing import wait_until

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" / "test-artifacts"))
MODEL = "remote_mvc.model"
BOUND = 10  # seconds a change may take to show on the page (far above the real figure; a loaded CI host)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing() -> str:
    for module in ("selenium", "starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            return f"python package {module} not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (shutil.which(path) or os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return ""


if _missing():
    if _in_ci():
        pytest.fail(f"browser tests cannot run under CI: {_missing()}", pytrace=False)
    pytest.skip(_missing(), allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A port for the gateway that stays the same across its restart (the page reconnects to it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=390,844", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    def __init__(self, driver, url: str) -> None:
        self.driver, self.url = driver, url

    def open(self, model: str = MODEL) -> Page:
        self.driver.get(f"{self.url}/#{model}")
        self.wait(lambda: self.state() == "live", "the page to be live")
        return self

    def wait(self, condition, what: str, timeout: float = BOUND):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: condition(), message=f"waiting for {what}; page state {self.state()!r}, "
                                           f"revision {self.revision()}, values {self.values()}")

    def state(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") or ""

    def revision(self) -> int:
        text = self.driver.find_element(By.TAG_NAME, "body").get_attribute("data-revision")
        return int(text) if text else -1

    def values(self) -> dict[str, str]:
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#fields tbody tr")
        return {r.get_attribute("data-field"): r.find_element(By.CSS_SELECTOR, "td.value").text for r in rows}

    def changed(self) -> set[str]:
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#fields tbody tr.changed")
        return {r.get_attribute("data-field") for r in rows}

    def history(self) -> list[str]:
        return [li.text for li in self.driver.find_elements(By.CSS_SELECTOR, "#history li")]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"gateway-{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot saved at {path}"
        assert path.stat().st_size > 5000
        return path

    def sign_in(self, identity: str, secret: str) -> None:
        d = self.driver
        d.find_element(By.ID, "identity").send_keys(identity)
        d.find_element(By.ID, "secret").send_keys(secret)
        d.find_element(By.ID, "signin-button").click()

    def result(self) -> str:
        return self.driver.find_element(By.ID, "result").text


class Lab:
    """A stack with the gateway as a process on a fixed port, and ctl as a subprocess."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.model = stack.model()
        stack.ticker(interval=0.3)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gateway = self.start_gateway()

    def start_gateway(self):
        proc = self.stack.process("gateway", identity="gateway", gateway_port=self.port, host="127.0.0.1",
                                  gateway_heartbeat=2.0)
        proc.wait_for_log(lambda line: line.get("event") == "gateway_started", 30)
        wait_until(self.healthy, 30, message="the gateway to be healthy")
        return proc

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        env = self.stack.env("ctl", identity="controller")
        done = subprocess.run([sys.executable, "-m", "remote_mvc.cli", *args], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done


@pytest.fixture
def lab(mvc_stack):
    return Lab(mvc_stack)


def test_page_follows_ctl_set_highlights_and_fits_a_phone(lab, browser):
    page = Page(browser, lab.url).open()
    assert page.values() == {"name": '"xxx"', "value": "0"} and page.revision() == 0
    lab.ctl("set", "name=from-ctl", "value=99")
    page.wait(lambda: page.values() == {"name": '"from-ctl"', "value": "99"}, "the ctl change on the page")
    assert page.revision() == 1
    assert page.changed() == {"name", "value"}  # highlighted
    page.wait(lambda: any("controller" in h and "99" in h for h in page.history()), "the change in the history")
    # a phone-sized window: nothing wider than the screen
    width = browser.execute_script("return document.documentElement.scrollWidth")
    viewport = browser.execute_script("return window.innerWidth")
    assert width <= viewport, f"the page is {width}px wide on a {viewport}px screen"
    page.screenshot("phone")
    browser.set_window_size(1280, 900)
    page.wait(lambda: browser.execute_script("return window.innerWidth") >= 1000, "a desktop-sized window")
    page.screenshot("desktop")


def test_sign_in_and_modify_from_the_page(lab, browser):
    page = Page(browser, lab.url).open()
    page.sign_in("controller", "wrong-secret")
    page.wait(lambda: "refused" in page.result(), "the refusal of a wrong secret")
    assert browser.find_element(By.ID, "signed-in").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "secret").get_attribute("value") == ""  # a refused secret is not kept
    browser.find_element(By.ID, "identity").clear()
    page.sign_in("controller", lab.stack.controller_secret)
    page.wait(lambda: browser.find_element(By.ID, "who").text == "controller", "the sign-in")
    assert browser.find_element(By.ID, "secret").get_attribute("value") == ""  # not kept in the form
    page.wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#inputs input[name=value]"), "the modify form")
    browser.find_element(By.CSS_SELECTOR, "#inputs input[name=value]").send_keys("1234")
    browser.find_element(By.CSS_SELECTOR, "#inputs input[name=name]").send_keys("from-page")
    browser.find_element(By.ID, "expect").click()
    browser.find_element(By.ID, "apply").click()
    page.wait(lambda: "applied: revision 1" in page.result(), "the page's modify to be applied")
    page.wait(lambda: page.values() == {"name": '"from-page"', "value": "1234"}, "the change on the page")
    query = lab.ctl("--json", "query").stdout
    assert '"value": 1234' in query and '"name": "from-page"' in query
    assert any("controller via gateway" in h for h in page.history())
    # an invalid value: the schema's message, nothing changed
    browser.find_element(By.CSS_SELECTOR, "#inputs input[name=value]").send_keys("12.5")
    browser.find_element(By.ID, "expect").click()  # off again
    browser.find_element(By.ID, "apply").click()
    page.wait(lambda: "not an integer" in page.result(), "the page to refuse a non-integer")
    page.screenshot("signed-in")


def test_page_recovers_from_gateway_and_model_server_restarts(lab, browser):
    page = Page(browser, lab.url).open()
    lab.ctl("set", "value=1")
    page.wait(lambda: page.values().get("value") == "1", "revision 1 on the page")
    lab.gateway.stop()
    page.wait(lambda: page.state() == "reconnecting", "the page to notice the gateway is gone")
    lab.ctl("set", "value=2")  # made while the gateway is down
    lab.ctl("set", "name=while-down")
    lab.gateway = lab.start_gateway()
    page.wait(lambda: page.values() == {"name": '"while-down"', "value": "2"}, "the values after the restart",
              timeout=30)
    page.wait(lambda: page.state() == "live", "the page live again")
    assert page.revision() == 3
    revisions = [int(h.split()[0][1:]) for h in page.history() if h.startswith("#")]
    assert sorted(revisions) == [1, 2, 3]  # resumed exactly: each change once, none missing
    # the model server restarts (a new process on the same state) under the open page
    lab.model.stop()  # idempotent: the stack stopping it again at the end is harmless
    model = lab.stack.process("model")
    model.wait_for_log(lambda line: line.get("event") == "registered", 30)
    lab.ctl("set", "value=4")
    page.wait(lambda: page.values().get("value") == "4", "a change after the model server restart", timeout=30)
    assert page.revision() == 4 and page.state() == "live"


def test_ticker_one_click_away(lab, browser):
    page = Page(browser, lab.url).open()
    browser.find_element(By.CSS_SELECTOR, "#tabs button[data-model='remote_mvc.ticker']").click()
    page.wait(lambda: "tick" in page.values(), "the ticker's fields")
    first = page.revision()
    page.wait(lambda: page.revision() >= first + 2, "the ticker to tick on the page")
    assert browser.current_url.endswith("#remote_mvc.ticker")
    page.screenshot("ticker")
