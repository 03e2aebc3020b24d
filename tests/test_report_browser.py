"""The report opened from disk in a real headless Chromium: every figure renders, no JS errors, the table sorts,
labels do not overlap, judged texts wrap."""

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
from test_report import BEST, INJECTED, LONG_PROMPT, SWEET, make_store  # pytest puts tests/ (no __init__.py) on sys.path

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
return Array.from(document.querySelectorAll('table.trials tbody tr')).map(row => row.querySelector('td.id').textContent);
"""
# Per figure: each annotation's text and box in the page ([left, top, right, bottom]), as drawn.
LABEL_BOXES_JS = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(div =>
    Array.from(div.querySelectorAll('g.annotation')).map(g => {
        const r = g.querySelector('rect.bg').getBoundingClientRect();
        return [g.textContent, r.left, r.top, r.right, r.bottom];
    }));
"""


def overlapping(boxes: list) -> list[tuple[str, str]]:
    return [
        (a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1 :]
        if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
    ]  # fmt: skip


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
    # Trials named by what differs in legends and labels; no two labels overlap, in two columns or one.
    assert BEST in figures[0].text and SWEET in figures[0].text
    for width in (1400, 1001, 1000):
        driver.set_window_size(width, 1000)
        time.sleep(1)  # plotly redraws a responsive figure when the window resizes
        drawn = driver.execute_script(LABEL_BOXES_JS)
        assert [box[0] for box in drawn[0]] == ["base model 0.5", BEST, SWEET]
        assert [overlapping(boxes) for boxes in drawn] == [[]] * planned, width
    driver.set_window_size(1400, 1000)

    # A long judged prompt wraps over several lines, whole: not clipped, not scrolled within its cell.
    prompt = driver.find_element(By.XPATH, f"//table[@class='samples']//td/div[text()='{LONG_PROMPT}']")
    height, scrolled, line = driver.execute_script(
        "const e = arguments[0]; return [e.getBoundingClientRect().height, e.scrollHeight - e.clientHeight,"
        " parseFloat(getComputedStyle(e).lineHeight)];",
        prompt,
    )
    assert height > 3 * line and scrolled == 0, (height, scrolled, line)
    # The table names each trial and highlights the best and the sweet spot.
    best_row = driver.find_element(By.CSS_SELECTOR, "table.trials tr.best")
    sweet_row = driver.find_element(By.CSS_SELECTOR, "table.trials tr.sweet-spot")
    assert best_row.find_element(By.CSS_SELECTOR, "td.name").text == "lr 2e-4 · r 16 ★ best"
    assert sweet_row.find_element(By.CSS_SELECTOR, "td.name").text == "lr 1e-3 · r 4 ◆ sweet spot"
    assert best_row.value_of_css_property("background-color") != sweet_row.value_of_css_property("background-color")

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
