#!/usr/bin/env python3
"""Drives the live fleet dashboard in headless Chromium.

Usage: python3 tests/python/dashboard_test.py CLI GRPC_ADDR HTTP_ADDR SCREENSHOT

Opens http://HTTP_ADDR/ in headless Chromium (Debian's chromium and
chromium-driver, through selenium), waits for the live event stream, then
registers and moves agents with the CLI (`CLI --server http://GRPC_ADDR ...`)
and waits, each time with a deadline, for the page to show them without a
reload: rows coloured by state, the live event feed, the per-state counts,
the label and category filters. Saves a screenshot to SCREENSHOT.

Exits 0 when every check passed, 1 on the first failed check.
"""

import shutil
import subprocess
import sys
import time
import traceback

from checks import CheckFailed, Checks  # noqa: E402  (tests/python/ is on sys.path)

WAIT = 20  # seconds, for every wait on the page


def main(argv):
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    cli_path, grpc_addr, http_addr, screenshot = argv[1:]
    c = Checks()

    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import Select, WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        print("FAIL: chromium and chromedriver must be on PATH (Debian: chromium chromium-driver)")
        return 1

    def cli(*args):
        proc = subprocess.run(
            [cli_path, "--server", f"http://{grpc_addr}", *args],
            capture_output=True, text=True, timeout=30,
        )
        if proc.returncode != 0:
            raise CheckFailed(f"CLI {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout.strip()

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    failed = 0
    try:
        # An agent that exists before the page opens is listed from the start.
        before = cli("register", "-q", "--name", "before", "--label", "team=ops")
        driver.get(f"http://{http_addr}/")
        # The page re-renders its rows as events arrive: an element found
        # just before a render is stale when read, and is looked up again.
        wait = WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,))

        def row_state(agent_id):
            rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-agent-id="{agent_id}"]')
            return rows[0].get_attribute("data-state") if rows else None

        def until(what, predicate):
            try:
                wait.until(lambda d: predicate())
            except Exception:
                raise CheckFailed(f"{what} within {WAIT}s") from None
            c.check(True, what, "")

        until("the page connects to the live event stream",
              lambda: driver.find_element(By.ID, "status").text == "live")
        until("an agent registered before the page opened is listed",
              lambda: row_state(before) == "registered")

        alpha = cli("register", "-q", "--name", "alpha", "--label", "team=ml")
        until("a new agent appears without a reload", lambda: row_state(alpha) == "registered")
        cli("deploy", alpha)
        cli("start", alpha)
        until("its row follows it to online", lambda: row_state(alpha) == "online")
        color = driver.find_element(
            By.CSS_SELECTOR, f'tr[data-agent-id="{alpha}"] td.state span').value_of_css_property("background-color")
        c.eq(color, "rgba(63, 185, 80, 1)", "online is coloured green")
        until("the event feed shows its five events",
              lambda: len(driver.find_elements(By.CSS_SELECTOR, f'#feed li[data-agent-id="{alpha}"]')) == 5)

        before_beta_ms = int(time.time() * 1000)
        beta = cli("register", "-q", "--name", "beta", "--label", "team=web")
        cli("deploy", beta)
        cli("start", beta)
        cli("error", beta, "out of memory")
        until("a failing agent turns to error", lambda: row_state(beta) == "error")
        until("the counts show one agent in error",
              lambda: any(chip.text == "error 1" for chip in driver.find_elements(By.CSS_SELECTOR, "#counts .chip")))

        Select(driver.find_element(By.ID, "category")).select_by_value("error")
        until("the error category shows only the failing agent",
              lambda: row_state(beta) == "error" and row_state(alpha) is None and row_state(before) is None)
        Select(driver.find_element(By.ID, "category")).select_by_value("")
        driver.find_element(By.ID, "label").send_keys("team=ml")
        until("the label filter shows only team=ml",
              lambda: row_state(alpha) == "online" and row_state(beta) is None)

        driver.find_element(By.ID, "label").clear()
        driver.execute_script("document.getElementById('label').dispatchEvent(new Event('input'))")

        # The timeline: a click on alpha's row draws its states as bands.
        driver.find_element(By.CSS_SELECTOR, f'tr[data-agent-id="{alpha}"]').click()
        until("the timeline shows alpha's five states in order",
              lambda: [band.get_attribute("data-state") for band in
                       driver.find_elements(By.CSS_SELECTOR, "#timeline svg rect")]
              == ["registered", "deploying", "deployed", "starting", "online"])
        # The time slider: the fleet as it was before beta was registered.
        driver.execute_script(
            "const s = document.getElementById('when'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('change'))", before_beta_ms)
        until("the slider shows the fleet before beta: no beta, alpha online",
              lambda: row_state(beta) is None and row_state(alpha) == "online"
              and driver.find_element(By.ID, "as-of").text.startswith("as of"))
        driver.find_element(By.ID, "live").click()
        until("back to live: beta is in error again", lambda: row_state(beta) == "error")
        until("the distribution chart has its bars",
              lambda: len(driver.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 30)
        c.check(driver.save_screenshot(screenshot), "screenshot saved", screenshot)
        with open(screenshot, "rb") as f:
            c.eq(f.read(8), b"\x89PNG\r\n\x1a\n", "the screenshot is a PNG")
    except CheckFailed as failure:
        print(f"FAIL: {failure}")
        failed = 1
    except Exception:
        traceback.print_exc()
        failed = 1
    finally:
        driver.quit()
    print(f"{c.passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
