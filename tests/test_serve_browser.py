"""The search page of `rkit serve`, end to end in a real headless Chromium: a real index, a real server, real models.

Skipped when Debian's chromium / chromedriver are absent, unless RKIT_REQUIRE_BROWSER=1 (then it fails).
Leaves a screenshot in tests/artefacts/serve-page.png and benchmarks/results/serve/search-page.png (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from retrieval_kit.paths import SAMPLE_CORPUS

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "tests" / "artefacts" / "serve-page.png"
README_SHOT = REPO / "benchmarks" / "results" / "serve" / "search-page.png"
RKIT = Path(sys.executable).with_name("rkit")
HEALTH_TIMEOUT_S = 180

PLANTED = "vault/zephyrine-vault.md"
PLANTED_TEXT = """# Zephyrine vault credential rotation

The zephyrine vault holds the service credentials for the billing cluster.
Rotate the zephyrine vault credentials every 90 days: generate a new credential pair, publish it to the
vault, wait for every consumer to pick it up, then revoke the old pair. The vault keeper on duty signs off
each rotation in the vault log.
"""
QUERY = "how often are the zephyrine vault credentials rotated"
XSS = "<img src=x onerror=alert(1)>"
# a document that carries markup of its own: the page must show it as text, in the snippet and the full chunk
MARKUP = "web/escaping-user-input.md"
MARKUP_TEXT = f"""# Escaping user input

A comment such as {XSS} or <script>alert('boo')</script> must be shown as text on every page, never
parsed as HTML: escape the text first, then add the markup of our own.
"""


def _browser_or_skip():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    reason = None
    if missing:
        reason = f"the browser test needs {' and '.join(missing)} (Debian packages chromium, chromium-driver)"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            reason = "the browser test needs selenium (pip install selenium)"
    if reason:
        if os.environ.get("RKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; RKIT_REQUIRE_BROWSER=1 makes that a failure")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"null")
        except json.JSONDecodeError:
            return err.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None, None


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory, encoder):
    _browser_or_skip()
    root = tmp_path_factory.mktemp("serve-browser")
    corpus = root / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    (corpus / PLANTED).parent.mkdir(parents=True)
    (corpus / PLANTED).write_text(PLANTED_TEXT)
    (corpus / MARKUP).parent.mkdir(parents=True)
    (corpus / MARKUP).write_text(MARKUP_TEXT)
    index_dir = root / "indexes"
    # built in-process with the session's models (what `rkit index` runs; the CLI itself is tested elsewhere),
    # so only the server below loads them again
    from retrieval_kit.indexer import IndexSettings, index_corpus

    index_corpus(corpus, index_dir / "kb", lambda: encoder, "default", IndexSettings())

    port = _free_port()
    log = root / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(RKIT), "serve", "--index", "kb", "--index-dir", str(index_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"rkit serve exited with {proc.returncode}:\n{_tail(log)}"
            status, body = _get(base + "/health")
            if status == 200:
                assert body["status"] == "ready", body
                break
            assert not (body and body.get("status") == "failed"), f"rkit serve failed to load: {body}\n{_tail(log)}"
            assert time.monotonic() < deadline, f"/health not ready after {HEALTH_TIMEOUT_S}s:\n{_tail(log)}"
            time.sleep(0.5)
        # one query first: the first search after start-up pays one-off costs (lazy BM25 load, warm-up), and
        # the screenshot should show a warm server's timing
        warm = urllib.request.Request(base + "/search", data=json.dumps({"query": "warm up", "k": 1}).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(warm, timeout=120) as resp:
            assert resp.status == 200
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def driver(server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.unhandled_prompt_behavior = "ignore"  # an alert() the page never meant stays up and fails the next step
    # an explicit driver path: Selenium Manager never looks for one on the network
    drv = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def _no_alert(drv):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = drv.switch_to.alert
    except NoAlertPresentException:
        return
    text = alert.text
    alert.dismiss()
    pytest.fail(f"text the page shows ran as script (alert {text!r})")


def _wait(drv, condition, timeout=30, message=""):
    from selenium.webdriver.support.ui import WebDriverWait

    def guarded(d):
        _no_alert(d)
        return condition(d)

    return WebDriverWait(drv, timeout, poll_frequency=0.1).until(guarded, message)


def _open(drv, base):
    from selenium.webdriver.common.by import By

    drv.get(base + "/")
    # ready once /indexes has filled the query-mode selector
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#mode option")) > 1, message="query modes never loaded")
    assert drv.switch_to.active_element == drv.find_element(By.ID, "q"), "the search box is not focused on load"


def _search(drv, query, explain=True, mode="", error=False):
    """Type a query and press Enter; returns the hit elements, [] for 'no results', or the error box's text
    (error=True; otherwise an error fails the test)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    box = drv.find_element(By.ID, "explain")
    if box.is_selected() != explain:
        box.click()
    Select(drv.find_element(By.ID, "mode")).select_by_value(mode)
    q = drv.find_element(By.ID, "q")
    drv.execute_script("arguments[0].value = arguments[1]", q, query[:-1])  # fast for a long query
    q.send_keys(query[-1], Keys.ENTER)

    def settled(d):
        if d.find_element(By.ID, "results").get_attribute("aria-busy") != "false":
            return False
        for sel in ("#hits .hit", "#empty:not([hidden])", "#error:not([hidden])"):
            if d.find_elements(By.CSS_SELECTOR, sel):
                return sel
        return False

    found = _wait(drv, settled, timeout=60, message=f"no results, empty state or error for {query[:80]!r}")
    shown = drv.find_element(By.ID, "error").text
    if error:
        assert found == "#error:not([hidden])", f"expected an error, got {found}"
        return shown
    assert found != "#error:not([hidden])", f"the page shows an error: {shown}"
    return drv.find_elements(By.CSS_SELECTOR, "#hits .hit")


def _no_js_errors(drv):
    severe = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe


def test_search_explain_and_read_the_planted_document(server, driver):
    from selenium.webdriver.common.by import By

    _open(driver, server)
    assert not driver.find_element(By.ID, "index-field").is_displayed(), "one index: no index selector"
    hits = _search(driver, QUERY)
    assert hits, "no hits"
    first = hits[0]
    assert first.get_attribute("data-chunk-id").startswith(PLANTED + "#"), [h.get_attribute("data-chunk-id") for h in hits]
    assert "Zephyrine vault credential rotation" in first.find_element(By.CSS_SELECTOR, ".title").text
    assert first.find_element(By.CSS_SELECTOR, ".rank").text == "1"
    assert PLANTED in first.find_element(By.CSS_SELECTOR, ".source").text
    score = first.find_element(By.CSS_SELECTOR, ".score").text
    assert len(score.split(".")[-1]) == 3, score
    badges = [b.text for b in first.find_elements(By.CSS_SELECTOR, ".badge")]
    assert badges and all("#" in b for b in badges), badges
    marks = {m.text.lower() for m in first.find_elements(By.CSS_SELECTOR, ".snippet mark")}
    assert {"zephyrine", "vault"} <= marks, marks
    status = driver.find_element(By.ID, "status").text
    assert "mode hybrid" in status and " ms" in status, status

    # the explanation follows the hits: loading, then decoded text or the note that explains why it is hidden
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#explanation-body .decoded, #explanation-body .note, "
                                                           "#explanation-body .error"),
          timeout=90, message="the explanation panel never left its loading state")
    assert driver.find_element(By.ID, "explanation").get_attribute("aria-busy") == "false"
    assert not driver.find_elements(By.CSS_SELECTOR, "#explanation-body .error"), \
        driver.find_element(By.ID, "explanation-body").text
    assert driver.find_element(By.ID, "explanation-body").text.strip()
    assert "Logit lens" in driver.find_element(By.ID, "explanation-body").text  # the lens the API sends is shown

    first.click()
    _wait(driver, lambda d: "vault keeper on duty" in d.find_element(By.ID, "detail-body").text,
          message="the detail panel never showed the chunk")
    detail = driver.find_element(By.ID, "detail-body")
    assert "Zephyrine vault credential rotation" in detail.find_element(By.CSS_SELECTOR, ".doc-title").text
    assert first.get_attribute("aria-current") == "true"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT))
    README_SHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SCREENSHOT, README_SHOT)
    _no_js_errors(driver)


def test_a_search_is_in_the_address_and_a_shared_link_runs_it(server, driver):
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    _open(driver, server)
    _search(driver, QUERY, explain=False)
    assert driver.current_url.endswith("/?q=" + quote(QUERY, safe="")), driver.current_url
    driver.get(server + "/?q=" + quote(QUERY, safe=""))  # what a colleague opens
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#hits .hit"), timeout=60,
          message="a /?q= link did not search")
    first = driver.find_elements(By.CSS_SELECTOR, "#hits .hit")[0]
    assert first.get_attribute("data-chunk-id").startswith(PLANTED + "#")
    assert driver.find_element(By.ID, "q").get_attribute("value") == QUERY
    _no_js_errors(driver)


def test_keyboard_moves_between_hits_and_opens_one(server, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open(driver, server)
    hits = _search(driver, QUERY, explain=False)
    assert len(hits) >= 2
    assert "Explanation is off" in driver.find_element(By.ID, "explanation-body").text
    driver.find_element(By.TAG_NAME, "h1").click()  # focus away from the box, then "/" brings it back
    ActionChains(driver).send_keys("/").perform()
    assert driver.switch_to.active_element == driver.find_element(By.ID, "q")
    ActionChains(driver).send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN).perform()
    assert driver.switch_to.active_element == hits[1]
    ActionChains(driver).send_keys(Keys.ARROW_UP, Keys.ENTER).perform()
    assert driver.switch_to.active_element == hits[0]
    _wait(driver, lambda d: "vault keeper on duty" in d.find_element(By.ID, "detail-body").text,
          message="Enter on a hit did not open it")
    q = driver.find_element(By.ID, "q")
    q.click()
    q.send_keys(Keys.ESCAPE)
    assert q.get_attribute("value") == ""
    _no_js_errors(driver)


def test_empty_error_and_markup_states(server, driver):
    from selenium.webdriver.common.by import By

    _open(driver, server)
    assert "Type a question" in driver.find_element(By.ID, "hint").text  # the empty state before a search
    assert _search(driver, "qwxyzzy flumbergast", explain=False, mode="bm25") == []
    assert "No results for “qwxyzzy flumbergast”" in driver.find_element(By.ID, "empty").text
    # a server-side refusal (422: over 1,000 characters) shows the JSON error's message
    message = _search(driver, "long " * 201, explain=False, error=True)
    assert "1000" in message and "query" in message, message

    # the XSS-looking query and a document holding the same markup: both render as text
    hits = _search(driver, XSS, explain=True, mode="")
    assert XSS in driver.find_element(By.ID, "status").text
    assert hits and hits[0].get_attribute("data-chunk-id").startswith(MARKUP + "#")
    assert XSS in hits[0].find_element(By.CSS_SELECTOR, ".snippet").text
    hits[0].click()
    _wait(driver, lambda d: "alert('boo')" in d.find_element(By.ID, "detail-body").text,
          message="the markup document's text never showed")
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#explanation-body .decoded, #explanation-body .note, "
                                                           "#explanation-body .error"), timeout=90)
    _no_alert(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, "img, script:not([src])"), "markup was injected as HTML"
    # the 422 above is the one failed request the console may show
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE" and "422" not in e.get("message", "")]
    assert not severe, severe
