"""The review page: its API on a literal folder, and a clerk's session in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import train_argv

from pipeline import schema as s
from pipeline.cli import main
from pipeline.decisions import latest, read_decisions

# The contract's flag columns (flags.csv may carry more, e.g. suggest_empty; a folder without them is read).
CONTRACT_FLAG_COLUMNS = ("record_id", "kind", "field", "value", "suggestion", "match_id", "score", "reason")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HEADLESS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def post(url: str, payload: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ------------------------------------------------------------------------------------------ the API


@pytest.fixture
def literal_folder(tmp_path: Path) -> Path:
    """A score folder whose duplicate matches a record that is only in the reference file."""
    out = tmp_path / "out"
    out.mkdir()
    columns = ["record_id", "city", "amount", *s.RECORD_COLUMNS]
    with open(out / s.RECORDS_FILE, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerow(["B1", "Amstredam", "10", "", "0", "", "city", "0.9", "0.1", "true"])
        writer.writerow(["B2", "Utrecht", "12", "H7", "0.9", "H7", "", "0.1", "0.1", "true"])
    with open(out / s.FLAGS_FILE, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CONTRACT_FLAG_COLUMNS)
        writer.writerow(["B1", "error", "city", "Amstredam", "Amsterdam", "", "0.9", "misspelled"])
        writer.writerow(["B2", "duplicate", "", "", "", "H7", "0.9", "same as H7"])
    reference = tmp_path / "history.csv"
    reference.write_text("record_id,city,amount\nH6,Ede,1\nH7,Utrecht,13\n", encoding="utf-8")
    summary = {
        "id_column": "record_id",
        "reference_path": str(reference),
        "model": {"name": "orders", "version": "3"},
        "minutes_saved_basis": {"minutes_per_correction": 4.0, "cost_per_hour": 45.0},
    }
    (out / s.SUMMARY_FILE).write_text(json.dumps(summary), encoding="utf-8")
    return out


@pytest.fixture
def server(literal_folder: Path) -> Iterator[str]:
    """The review app on a free port, in a thread of this process."""
    import uvicorn

    from pipeline.review import ReviewFolder, create_app

    app = create_app(ReviewFolder.load(literal_folder))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    wait_for(url)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def test_queue_shows_the_matched_record_from_the_reference_and_the_money_basis(server: str) -> None:
    with urllib.request.urlopen(server + "api/queue") as response:
        queue = json.loads(response.read())
    assert [f["record_id"] for f in queue["flags"]] == ["B1", "B2"]  # flags.csv order
    assert queue["columns"] == ["record_id", "city", "amount"]  # input columns, not the score columns
    assert queue["flags"][1]["match"] == {"record_id": "H7", "city": "Utrecht", "amount": "13"}
    assert queue["flags"][1]["record"]["amount"] == "12"
    assert queue["cost_per_hour"] == 45.0 and queue["model"]["version"] == "3"
    with urllib.request.urlopen(server) as response:
        assert b"/static/review.js" in response.read()  # served locally, nothing from a CDN


def test_decisions_are_saved_at_once_and_bad_ones_refused(server: str, literal_folder: Path) -> None:
    api = server + "api/decisions"
    status, row = post(api, {"record_id": "B1", "kind": "error", "field": "city", "decision": "edit",
                             "new_value": "Amsterdam", "seconds": 12.345})  # fmt: skip
    assert status == 200 and row["value"] == "Amstredam" and row["seconds"] == "12.3"
    saved = read_decisions(literal_folder / s.DECISIONS_FILE)
    assert saved[[s.DECISION, s.DECISION_NEW_VALUE]].values.tolist() == [["edit", "Amsterdam"]]
    status, answer = post(api, {"record_id": "B9", "kind": "error", "field": "city", "decision": "accept"})
    assert status == 404 and "no such flag" in answer["detail"]
    status, answer = post(
        api, {"record_id": "B2", "kind": "duplicate", "match_id": "H6", "decision": "accept"}
    )
    assert status == 404
    status, answer = post(
        api, {"record_id": "B2", "kind": "duplicate", "match_id": "H7", "decision": "later"}
    )
    assert status == 422 and "not one of accept, edit, reject" in answer["detail"]
    status, answer = post(api, {"record_id": "B2", "kind": "duplicate", "match_id": "H7", "decision": "edit"})
    assert status == 422 and "only an error flag can be edited" in answer["detail"]
    assert len(read_decisions(literal_folder / s.DECISIONS_FILE)) == 1  # refused ones are not written


def test_two_tabs_deciding_at_once_lose_nothing(server: str, literal_folder: Path) -> None:
    api = server + "api/decisions"
    payloads = [
        {"record_id": "B1", "kind": "error", "field": "city", "decision": "accept"},
        {"record_id": "B2", "kind": "duplicate", "match_id": "H7", "decision": "reject"},
    ] * 20
    threads = [threading.Thread(target=post, args=(api, p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = read_decisions(literal_folder / s.DECISIONS_FILE)
    assert len(rows) == 40
    assert sorted(latest(rows)[s.DECISION]) == ["accept", "reject"]
    with urllib.request.urlopen(server + "api/decisions") as response:
        assert len(json.loads(response.read())["decisions"]) == 2


# ------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def scored(demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo, trained and scored through the CLI as a user runs it."""
    work = tmp_path_factory.mktemp("review")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    assert main([*train_argv(demo, uri), "-q"]) == 0
    out = work / "out"
    args = ["score", "--model", "models:/orders/1", "--input", str(demo.batch), "--output", str(out)]
    assert main([*args, "--reference", str(demo.records), "--tracking-uri", uri, "-q"]) == 0
    return out


@pytest.fixture
def review_server(scored: Path) -> Iterator[str]:
    """`python -m pipeline review DIR --port P`, as a clerk starts it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "review", str(scored), "--port", str(port), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/api/queue")
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (scripts/ensure-chromium installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="review-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*HEADLESS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_a_clerk_accepts_edits_and_rejects_with_the_keyboard(
    browser, review_server: str, scored: Path, demo, tmp_path: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    decisions = scored / s.DECISIONS_FILE
    flags = pd.read_csv(scored / s.FLAGS_FILE, dtype=str, keep_default_na=False)
    errors = flags[flags[s.FLAG_KIND] == s.KIND_ERROR]
    assert (flags[s.FLAG_KIND] == s.KIND_DUPLICATE).any() and len(errors) >= 2
    # The page re-renders the detail pane after each key: an element found a moment ago may be gone.
    wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))

    def press(key: str) -> None:
        ActionChains(browser).send_keys(key).perform()

    def saved(n: int) -> None:
        wait.until(lambda _: decisions.exists() and len(read_decisions(decisions)) == n)

    def current_title() -> str:
        return browser.find_element(By.CSS_SELECTOR, "#detail h2").text

    browser.get(review_server)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue li")) == len(flags))
    wait.until(lambda d: "0 done" in d.find_element(By.ID, "progress-text").text)

    # Accept the first duplicate with `a`.
    Select(browser.find_element(By.ID, "filter-kind")).select_by_value("duplicate")
    wait.until(lambda _: current_title().startswith("duplicate flag"))
    press("a")
    saved(1)

    # Type the right value of the first error with `e` ... Enter, then reject the next one with `r`.
    Select(browser.find_element(By.ID, "filter-kind")).select_by_value("error")
    wait.until(lambda _: current_title().startswith("error flag"))
    press("e")
    box = browser.find_element(By.ID, "new-value")
    wait.until(lambda _: browser.switch_to.active_element == box)
    box.clear()
    box.send_keys("TYPED-BY-CLERK\n")
    saved(2)
    wait.until(lambda _: current_title().startswith("error flag") and "TYPED" not in browser.page_source)
    press("r")
    saved(3)

    browser.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queue li")) == len(flags))

    def decided_classes(d) -> list[str]:
        done = d.find_elements(By.CSS_SELECTOR, "#queue li.accept, #queue li.edit, #queue li.reject")
        return sorted(li.get_attribute("class").split()[0] for li in done)

    wait.until(lambda d: decided_classes(d) == ["accept", "edit", "reject"])
    wait.until(lambda d: "3 done" in d.find_element(By.ID, "progress-text").text)

    chosen = latest(read_decisions(decisions))
    assert chosen[[s.FLAG_KIND, s.DECISION]].values.tolist() == [
        ["duplicate", "accept"],
        ["error", "edit"],
        ["error", "reject"],
    ]
    log = tmp_path / "corrections.csv"
    shutil.copy(demo.corrections, log)
    before = len(pd.read_csv(log, dtype=str))
    assert main(["feedback", "--decisions", str(decisions), "--corrections", str(log)]) == 0
    rows = pd.read_csv(log, dtype=str, keep_default_na=False).iloc[before:]
    first_dup = flags[flags[s.FLAG_KIND] == s.KIND_DUPLICATE].iloc[0]
    edited, rejected = chosen.iloc[1], chosen.iloc[2]
    columns = [s.LOG_RECORD_ID, s.LOG_ACTION, s.LOG_FIELD, s.LOG_NEW_VALUE, s.LOG_MERGED_INTO]
    assert rows[columns].values.tolist() == [
        [first_dup[s.FLAG_RECORD_ID], "merge", "", "", first_dup[s.FLAG_MATCH_ID]],
        [edited[s.FLAG_RECORD_ID], "edit", edited[s.FLAG_FIELD], "TYPED-BY-CLERK", ""],
        [rejected[s.FLAG_RECORD_ID], "confirm", rejected[s.FLAG_FIELD], rejected[s.FLAG_VALUE], ""],
    ]  # fmt: skip
    assert edited[s.FLAG_RECORD_ID] == errors.iloc[0][s.FLAG_RECORD_ID]
    assert set(rows[s.LOG_SOURCE]) == {"review"}
