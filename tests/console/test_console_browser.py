"""The console in a real browser against a real daemon fed real HL7 over MLLP.

One daemon and one Chromium for the module; the tests run in order, as an
operator's morning would: sign in, watch a feed go quiet, mend a parked
message, look at today's schedule, then the same as a viewer.  Each page is
saved as a 1366x768 screenshot in build/artifacts/console/.
"""
from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from hl7.client import MLLPClient, check_ack
from hl7.console.passwords import hash_password
from tests.console.browser import WIDTH, require_chromium, screenshot, start_browser, stop_browser
from tests.e2e.daemon import DaemonConfig, DaemonProcess

pytestmark = pytest.mark.slow

SILENCE_SECONDS = 3
CLINIC = ZoneInfo("America/New_York")

SIU = ("MSH|^~\\&|EPIC|NORTHCLINIC|SLOTENGINE|SE|20260302080000||SIU^S12^SIU_S12|{cid}|P|2.5.1\r"
       "SCH|{placer}^EPIC|F{placer}^EPIC|||||ROUTINE^Routine visit|NORMAL|15|min|^^15^{start}^{end}"
       "||||||||||||||Booked\r"
       "PID|1||{pid3}||{family}^{given}||19800101|F\r"
       "RGS|1|A\r"
       "AIP|1|A|DRSMITH^Smith^Ann|ATTENDING\r")
A40 = ("MSH|^~\\&|EPIC|NORTHCLINIC|SLOTENGINE|SE|20260302080000||ADT^A40^ADT_A39|{cid}|P|2.5.1\r"
       "EVN|A40|20260302080000\r"
       "PID|1||MRNA1^^^NORTH^MR||Merged^Morgan||19800101|F\r"
       "MRG|MRNB1^^^NORTH^MR\r")


def hl7_time(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


def siu(cid: str, placer: str, pid3: str, *, start: datetime, family: str = "Testperson", given: str = "Alex") -> bytes:
    return SIU.format(cid=cid, placer=placer, pid3=pid3, family=family, given=given, start=hl7_time(start),
                      end=hl7_time(start + timedelta(minutes=15))).encode()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1):
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except StaleElementReferenceException:  # the page refreshed itself between find and read
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    require_chromium()
    directory = tmp_path_factory.mktemp("console")
    users = [("alice", "interface", "alice-secret"), ("victor", "viewer", "victor-secret")]
    extra = "[console]\nenabled = true\nsession_minutes = 60\n" + "".join(
        f'\n[[console.users]]\nname = "{name}"\nrole = "{role}"\npassword_hash = "{hash_password(password)}"\n'
        for name, role, password in users)
    config = DaemonConfig(directory, f"sqlite:///{directory / 'console.db'}", extra=extra,
                          feeds=[{"name": "ehr", "mode": "mirror", "expect_message_every_seconds": SILENCE_SECONDS}])
    process = DaemonProcess(config).start()
    process.db = directory / "console.db"
    process.url = f"http://127.0.0.1:{config.http_port}/console"
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser():
    driver, profile = start_browser()
    yield driver
    stop_browser(driver, profile)


@pytest.fixture
def send(daemon):
    clients = []

    def send_one(message: bytes) -> str:
        if not clients:
            clients.append(MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10))
        control_id = message.split(b"\r", 1)[0].split(b"|")[9].decode()
        ok, code, text = check_ack(control_id, clients[0].send(message))
        assert ok, f"{control_id}: {code} {text}"
        return control_id

    yield send_one
    for client in clients:
        client.close()


def rows(db, sql, *params):
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def sign_in(browser, daemon, name: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(daemon.url + "/")
    wait_until(lambda: "/console/login" in browser.current_url)
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "password").send_keys(password)
    click_and_wait(browser, browser.find_element(By.ID, "sign-in"))
    assert browser.find_elements(By.ID, "signed-in-as")


def click_and_wait(browser, element) -> None:
    """Click something that loads a new page, and wait until the old one is gone."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser.find_element(By.TAG_NAME, "html")
    element.click()

    def gone(_browser) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            # asked while the new page replaces the old, chromedriver answers "Node with
            # given id does not belong to the document" instead of a stale reference
            if "does not belong to the document" in (exc.msg or ""):
                return True
            raise
        return False

    WebDriverWait(browser, 15).until(gone)


def text_of(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "main").text


def fits_laptop_width(browser) -> bool:
    return browser.execute_script("return document.documentElement.scrollWidth") <= WIDTH


def test_sign_in_and_a_quiet_feed_turns_red(daemon, browser, send):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(daemon.url + "/")
    wait_until(lambda: "/console/login" in browser.current_url)
    browser.find_element(By.ID, "name").send_keys("alice")
    browser.find_element(By.ID, "password").send_keys("not-her-password")
    click_and_wait(browser, browser.find_element(By.ID, "sign-in"))
    wait_until(lambda: "Wrong name or password" in text_of(browser))
    screenshot(browser, "login")

    sign_in(browser, daemon, "alice", "alice-secret")
    send(siu("Q1", "PQ1", "MRNQ1^^^NORTH^MR", start=datetime(2026, 3, 10, 9, 0, tzinfo=CLINIC)))
    browser.get(daemon.url + "/")

    def feed_state() -> str:
        return browser.find_element(By.CSS_SELECTOR, 'tr[data-feed="ehr"]').get_attribute("data-state")

    assert feed_state() == "ok"
    assert "receiving" in browser.find_element(By.CSS_SELECTOR, 'tr[data-feed="ehr"]').text.lower()
    assert fits_laptop_width(browser)
    screenshot(browser, "feeds-receiving")
    # No reload from here: the page refreshes itself, and the feed goes red once it is quiet for too long.
    wait_until(lambda: feed_state() == "silent", timeout=SILENCE_SECONDS + 15)
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-feed="ehr"]').text
    assert "SILENT FOR" in row.upper(), row  # in words and an icon, not only in red
    assert "AA 1" in row
    screenshot(browser, "feeds-silent")


def test_a_parked_message_is_found_replayed_and_applied(daemon, browser, send):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    visit = datetime(2026, 3, 11, 9, 0, tzinfo=CLINIC)
    send(siu("R1", "PR1", "MRNA1^^^NORTH^MR", start=visit))
    send(siu("R2", "PR2", "MRNB1^^^NORTH^MR", start=visit + timedelta(hours=1), family="Other", given="Sam"))
    # Both identifiers in one PID-3, but we hold them as two people: parked until a merge.
    send(siu("R3", "PR3", "MRNA1^^^NORTH^MR~MRNB1^^^NORTH^MR", start=visit + timedelta(hours=2)))
    wait_until(lambda: rows(daemon.db, "select status from inbound_messages where control_id='R3'") == [("parked",)])

    sign_in(browser, daemon, "alice", "alice-secret")
    browser.get(daemon.url + "/messages")
    Select(browser.find_element(By.ID, "status")).select_by_visible_text("parked")
    click_and_wait(browser, browser.find_element(By.ID, "search"))
    assert "status=parked" in browser.current_url
    parked = browser.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-status]")
    assert [row.get_attribute("data-control-id") for row in parked] == ["R3"]
    assert "merge, A40, is needed first" in parked[0].text
    screenshot(browser, "messages-parked")

    click_and_wait(browser, parked[0].find_element(By.LINK_TEXT, "R3"))
    page = text_of(browser)
    assert "Patient identifier list" in page and "Scheduling activity information" in page  # named by hl7apy
    assert "MRNB1" in page  # this role sees patient data
    assert browser.find_element(By.ID, "message-status").text == "parked"
    assert fits_laptop_width(browser)
    screenshot(browser, "message-parked")

    send(A40.format(cid="R4").encode())  # the EHR merges the two records
    wait_until(lambda: rows(daemon.db, "select status from inbound_messages where control_id='R4'") == [("applied",)])
    browser.get(daemon.url + "/messages?status=parked")
    browser.find_element(By.CSS_SELECTOR, '#messages input[name="id"]').click()
    click_and_wait(browser, browser.find_element(By.ID, "replay-selected"))
    assert "Queued for replay" in text_of(browser)
    message_id = rows(daemon.db, "select id from inbound_messages where control_id='R3'")[0][0]
    wait_until(lambda: rows(daemon.db, "select status from inbound_messages where id=?", message_id) == [("applied",)])
    browser.get(f"{daemon.url}/messages/{message_id}")
    assert browser.find_element(By.ID, "message-status").text == "applied"
    audit = browser.find_element(By.ID, "audit").text
    assert "operator:alice" in audit and "message replayed" in audit and "appointment" in audit
    screenshot(browser, "message-applied")
    assert rows(daemon.db, "select actor, source from audit where action='message_replayed'") == [
        ("operator:alice", "console: messages replay")]


def test_todays_schedule_shows_a_booking_as_it_arrives(daemon, browser, send):
    from selenium.webdriver.common.by import By

    today = datetime.now(CLINIC).date()
    start = datetime.combine(today, datetime.min.time(), tzinfo=CLINIC).replace(hour=10, minute=45)
    send(siu("S1", "PS1", "MRNS1^^^NORTH^MR", start=start, family="Rivera", given="Dana"))
    wait_until(lambda: rows(daemon.db, "select status from inbound_messages where control_id='S1'") == [("applied",)])

    sign_in(browser, daemon, "alice", "alice-secret")
    browser.get(f"{daemon.url}/schedule?by=provider&code=DRSMITH")
    day = browser.find_element(By.ID, "day").text
    assert f"{today:%A %d %B %Y}" in text_of(browser) and "(today)" in text_of(browser)
    assert "10:45–11:00" in day and "Rivera, Dana (MRNS1)" in day and "BOOKED" in day.upper()
    assert fits_laptop_width(browser)
    booking = browser.find_element(By.CSS_SELECTOR, 'tr[data-kind="appointment"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", booking)
    screenshot(browser, "schedule-day")
    browser.get(f"{daemon.url}/schedule?by=provider&code=DRSMITH&view=week")
    assert "Rivera, Dana" in browser.find_element(By.ID, "week").text
    screenshot(browser, "schedule-week")


def test_a_viewer_sees_redacted_identifiers_and_cannot_replay(daemon, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, daemon, "victor", "victor-secret")
    assert "viewer" in browser.find_element(By.ID, "signed-in-as").text
    browser.get(f"{daemon.url}/schedule?by=provider&code=DRSMITH")
    day = browser.find_element(By.ID, "day").text
    assert "Rivera" not in day and "MRNS1" not in day and "patient ~" in day
    booking = browser.find_element(By.CSS_SELECTOR, 'tr[data-kind="appointment"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", booking)
    screenshot(browser, "schedule-viewer")

    message_id = rows(daemon.db, "select id from inbound_messages where control_id='R3'")[0][0]
    browser.get(f"{daemon.url}/messages/{message_id}")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "MRNA1" not in page and "MRNB1" not in page and "Testperson" not in page
    assert "[hidden: ~" in page and "Patient identifier list" in page
    assert not browser.find_elements(By.ID, "raw-text")
    assert not browser.find_elements(By.ID, "replay")
    screenshot(browser, "message-viewer")


def test_plugins_jobs_and_outbox_pages(daemon, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, daemon, "alice", "alice-secret")
    browser.get(daemon.url + "/system")
    plugins = browser.find_element(By.ID, "plugins").text
    assert "reminders" in plugins and "slotengine_schedule_changed" in plugins
    jobs = browser.find_element(By.ID, "jobs").text
    assert "reminders.send" in jobs
    assert fits_laptop_width(browser)
    screenshot(browser, "plugins-and-jobs")
    browser.get(daemon.url + "/outbox")
    assert browser.find_element(By.ID, "outbox")
    screenshot(browser, "outbox")
    click_and_wait(browser, browser.find_element(By.CSS_SELECTOR, "form.who button"))
    assert "/console/login" in browser.current_url
    browser.get(daemon.url + "/messages")
    wait_until(lambda: "/console/login" in browser.current_url)  # signed out for good
