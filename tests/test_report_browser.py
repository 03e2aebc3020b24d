"""The report opened from disk in a real headless Chromium: every figure renders, no JS errors, the table sorts."""

import base64
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from analysis.report import report_data, write_report
from test_report import INJECTED, make_store  # pytest puts tests/ (no __init__.py) on sys.path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def wait_for_chromium(timeout_s: float = 900) -> None:
    """Chromium may still be being installed by apt when the tests start: wait, never skip."""
    deadline = time.monotonic() + timeout_s
    while not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install chromium chromium-driver")
        time.sleep(5)


@pytest.fixture
def driver(tmp_path):
    wait_for_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


RENDERED_FIGURES_JS = """
return Array.from(document.querySelectorAll('.plotly-graph-div'))
    .filter(div => div.querySelector('.main-svg') !== null).length;
"""
# Per figure: how many SVG traces plotly drew (scatter and bar layers), so an empty frame does not pass.
DRAWN_TRACES_JS = """
return Array.from(document.querySelectorAll('.plotly-graph-div'))
    .map(div => div.querySelectorAll('svg .scatterlayer .trace, svg .barlayer .trace').length);
"""
TRIAL_ORDER_JS = """
return Array.from(document.querySelectorAll('table.trials tbody tr')).map(row => row.cells[0].textContent);
"""


def click_header(driver, name: str) -> list[str]:
    header = driver.find_element(By.XPATH, f"//table[contains(@class, 'trials')]//th[normalize-space(.)='{name}']/button")
    header.click()
    return driver.execute_script(TRIAL_ORDER_JS)


def test_report_renders_in_chromium(tmp_path, driver):
    store = make_store(tmp_path / "results.db")
    data = report_data(store)
    planned = data.figure_count
    report = write_report(store, tmp_path / "report.html")
    store.close()

    driver.get(report.as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(RENDERED_FIGURES_JS) >= planned)

    figures = driver.find_elements(By.CSS_SELECTOR, ".plotly-graph-div")
    assert planned == 9 and len(figures) == planned
    assert driver.execute_script(RENDERED_FIGURES_JS) == planned
    assert all(n > 0 for n in driver.execute_script(DRAWN_TRACES_JS)), driver.execute_script(DRAWN_TRACES_JS)
    # Each figure sits under its title with its caption; the frontier drew its step line and legend.
    titles = [f.find_element(By.XPATH, "./ancestor::figure/h3").text for f in figures]
    assert titles[:2] == ["Cost vs win rate", "Cost vs perplexity"] and len(set(titles)) == planned
    assert "Pareto frontier" in figures[0].text and "early stopped (1)" in figures[0].text
    assert "diverged (1)" in figures[0].text  # a failed trial with metrics is drawn, in its own style
    assert "Sweet spot: trial t-cheap" in driver.find_element(By.CSS_SELECTOR, ".summary").text

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    injected = driver.find_elements(By.XPATH, f"//td/div[text()='{INJECTED}']")
    assert len(injected) == 1 and injected[0].is_displayed()

    # Sorting: by training time, cheapest first, trials without a value last; a second click reverses.
    assert driver.execute_script(TRIAL_ORDER_JS) == list(data.trials["trial_id"])
    assert click_header(driver, "train_seconds") == ["t-late", "t-cheap", "t-good", "t-mid", "t-bad", "t-oom", "t-crash"]
    assert click_header(driver, "train_seconds") == ["t-bad", "t-mid", "t-good", "t-cheap", "t-late", "t-oom", "t-crash"]
    assert click_header(driver, "win_rate") == ["t-bad", "t-cheap", "t-mid", "t-good", "t-late", "t-oom", "t-crash"]
    assert click_header(driver, "trial_id")[:3] == ["t-bad", "t-cheap", "t-crash"]

    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []

    # The whole page, beyond the window, as one picture for a person to look at.
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(base64.b64decode(shot["data"]))
