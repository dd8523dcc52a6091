"""The console in a real browser: headless Chromium driven by Selenium, run by tests/console.rs.

Signs in as a viewer (every page, no edit controls, a chart whose points add up to the ledger)
and as an editor (a policy edit with a mistake shown at its line and column, a published fix, a
rollback, a tier change), signs out, and saves a screenshot of each page, printing their paths.
Configured by the environment: CONSOLE_URL, VIEWER_TOKEN, EDITOR_TOKEN, EXPECT_ADMITTED, SHOTS.
"""

import os
import shutil
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.support.ui import Select, WebDriverWait

URL = os.environ["CONSOLE_URL"]
SHOTS = os.environ["SHOTS"]


def browser():
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--no-proxy-server", "--disable-gpu"):
        opts.add_argument(arg)
    chromium = shutil.which("chromium")
    if chromium:
        opts.binary_location = chromium
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def shot(d, name):
    path = os.path.join(SHOTS, f"{name}.png")
    d.save_screenshot(path)
    print(f"screenshot {name}: {path}")


def wait(d, css):
    return WebDriverWait(d, 10, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.find_element(By.CSS_SELECTOR, css))


def submit(d, button, css):
    """Clicks a button that loads a new page and waits for that page's `css`: waiting for the old
    page to go first, so an element of the page being left is never taken for the answer. The old
    page is marked in its own window object, which a new document does not have; asking for an old
    element instead fails in more than one way while the document is being swapped (chromedriver
    answers "unknown error: node does not belong to the document" as well as "stale element"), so
    any driver error during the swap only means "ask again"."""
    d.execute_script("window.__tollgateLeaving = true")
    button.click()
    WebDriverWait(d, 10, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return window.__tollgateLeaving === undefined"))
    return wait(d, css)


def sign_in(d, token):
    d.get(URL + "/console/login")
    d.find_element(By.ID, "token").send_keys(token)
    submit(d, d.find_element(By.ID, "sign-in"), "#sign-out")
    assert d.current_url.endswith("/console/overview"), d.current_url


def sign_out(d):
    submit(d, d.find_element(By.ID, "sign-out"), "#sign-in")


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)


def viewer(d):
    sign_in(d, os.environ["VIEWER_TOKEN"])
    d.get(URL + "/console/overview?range=hour")
    points = d.find_elements(By.CSS_SELECTOR, '#chart-requests g[data-series="admitted"] circle')
    check(len(points) == 60, f"60 one-minute points, got {len(points)}")
    total = sum(float(p.get_attribute("data-value")) for p in points)
    check(total == float(os.environ["EXPECT_ADMITTED"]), f"admitted points add up to the ledger: {total}")
    shot(d, "overview")
    for page in ("subjects", "subjects/acme", "policies", "gateways", "changes"):
        d.get(f"{URL}/console/{page}")
        wait(d, "#sign-out")
        for control in ("#change-tier", "#issue-key", "#edit-policy", "button.rollback", "#publish"):
            check(not d.find_elements(By.CSS_SELECTOR, control), f"a viewer sees {control} on {page}")
        shot(d, "viewer-" + page.replace("/", "-"))
    sign_out(d)


def editor(d):
    sign_in(d, os.environ["EDITOR_TOKEN"])
    d.get(URL + "/console/policies")
    area = submit(d, d.find_element(By.ID, "edit-policy"), "#yaml")
    good = area.get_attribute("value")
    lines = good.split("\n")
    at = next(i for i, line in enumerate(lines) if "daily: 100 }" in line)
    broken = "\n".join(lines[:at] + [lines[at].replace("daily: 100", "daily: lots")] + lines[at + 1:])
    d.execute_script("arguments[0].value = arguments[1]", area, broken)
    errors = submit(d, d.find_element(By.ID, "validate"), "li.policy-error").text
    check(f"line {at + 1}, column" in errors, f"the error is shown at line {at + 1}: {errors}")
    shot(d, "editor-error")
    fixed = good.replace("version: console-test", "version: console-browser", 1)
    d.execute_script("arguments[0].value = arguments[1]", d.find_element(By.ID, "yaml"), fixed)
    d.find_element(By.ID, "comment").send_keys("relabelled in the browser")
    published = submit(d, d.find_element(By.ID, "publish"), "#published").text
    check("is active" in published, published)
    check("relabelled in the browser" in d.find_element(By.ID, "versions").text, "the comment is in the history")
    shot(d, "policies-published")
    submit(d, d.find_element(By.CSS_SELECTOR, "button.rollback"), "#published")
    check("rollback to v" in d.find_element(By.ID, "versions").text, "the rollback is in the history")
    shot(d, "policies-rolled-back")
    d.get(URL + "/console/policies/diff?from=1&to=2")
    wait(d, "#diff")
    shot(d, "policy-diff")
    d.get(URL + "/console/subjects/bob")
    Select(d.find_element(By.ID, "tier-select")).select_by_value("free")
    tier = submit(d, d.find_element(By.ID, "change-tier"), "#tier").text
    check(tier == "free", f"the subject page shows the new tier: {tier}")
    shot(d, "subject-tier-changed")
    sign_out(d)
    d.get(URL + "/console/overview")
    wait(d, "#sign-in")
    check(d.current_url.endswith("/console/login"), "signed out: " + d.current_url)


def main():
    d = browser()
    try:
        viewer(d)
        editor(d)
    finally:
        d.quit()
    print("BROWSER TEST PASSED")


if __name__ == "__main__":
    main()
