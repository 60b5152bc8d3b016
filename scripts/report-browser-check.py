#!/usr/bin/env python3
"""The drift reports in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven with Selenium (pinned, PyPI) against `continuum serve`.

Run by `make test` (which installs both) as
    scripts/report-browser-check.py .build/debug/continuum

Starts the server the zero-config way with small levels, teaches two users
and audits them through the API, then in the browser: the ranking page sends
an unsigned browser to /signin; a wrong key and an app key are refused there;
the admin key signs in (an HttpOnly cookie: the page's scripts cannot read
it), lands on the tenant's ranking with a link per user; the user's page
shows the SVG charts of drift over versions; signing out ends the session.
Exits non-zero on failure.
"""
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from continuum_serve import ZeroConfigServer  # noqa: E402

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".build/debug/continuum")
LEVELS = {"levels": [{"name": "mid", "chunk_size": 32, "width": 4, "layers": [28, 29], "learning_rate": 0.003},
                     {"name": "fast", "chunk_size": 8, "width": 4, "layers": [28, 29], "learning_rate": 0.01}],
          "min_surprise": 0}
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)), flush=True)
    if not ok:
        failures.append(name)


def api(server, method, path, body=None, key=None):
    req = urllib.request.Request(server.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key or server.key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read() or b"{}")


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"]:
        options.add_argument(a)
    return webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)


def main():
    settings = tempfile.mkdtemp(prefix="continuum-browser-settings-")
    with open(os.path.join(settings, "levels.json"), "w") as f:
        json.dump(LEVELS, f)
    with ZeroConfigServer(BIN, ["--levels", settings + "/levels.json"], prefix="continuum-browser-") as server:
        server.keep = True
        for user, text in [("alice", "My cat is called Zorblax and my dog is called Quillon."),
                           ("bob", "I sail a small boat called the Tern on the lake every weekend.")]:
            for _ in range(2):
                api(server, "POST", "/v1/generate", {"user": user, "prompt": text, "max_tokens": 2, "wait_for_learning": True})
            api(server, "POST", f"/v1/users/{user}/audit", None)
        app_key = subprocess.run([BIN, "keys", "create", "--tenant", "dev", "--role", "app", "--data-dir", server.workdir + "/data"],
                                 capture_output=True, text=True).stdout.split("API key: ")[-1].strip()
        driver = browser()
        try:
            driver.get(server.base + "/v1/audit?format=html")
            check("an unsigned browser is sent to the sign-in page", driver.current_url.endswith("/signin"), driver.current_url)

            def settled(action):
                """Runs `action` (a click that navigates) and waits for the new page to have loaded."""
                old = driver.find_element(By.TAG_NAME, "html")
                action()
                WebDriverWait(driver, 30).until(EC.staleness_of(old))
                WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")

            def sign_in(key):
                field = driver.find_element(By.ID, "key")
                field.clear()
                field.send_keys(key)
                settled(lambda: driver.find_element(By.ID, "submit").click())

            sign_in("ck-not-a-key")
            errors = driver.find_elements(By.ID, "error")
            check("a wrong key is refused on the page", errors and "not a valid" in errors[0].text, driver.page_source[:300])
            sign_in(app_key)
            errors = driver.find_elements(By.ID, "error")
            check("an app key is refused on the page", errors and "admin key" in errors[0].text, driver.page_source[:300])
            sign_in(server.key)
            check("the admin key signs in to the tenant's ranking", driver.current_url.endswith("/v1/audit?format=html"),
                  driver.current_url)
            check("the session cookie is HttpOnly (the page's scripts cannot read it)",
                  driver.execute_script("return document.cookie") == "" and any(c["name"] == "continuum_session" and c["httpOnly"]
                                                                               and c.get("sameSite") == "Strict"
                                                                               for c in driver.get_cookies()),
                  driver.get_cookies())
            links = {a.text: a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "table a")}
            check("the ranking lists both users, each linking to their page", {"alice", "bob"} <= set(links), links)
            settled(lambda: driver.find_element(By.LINK_TEXT, "alice").click())
            check("the user's page opens", "Drift audit: alice" in driver.find_element(By.TAG_NAME, "h1").text, driver.title)
            charts = driver.find_elements(By.CSS_SELECTOR, "div.charts svg")
            check("the user's page shows its charts (inline SVG, drawn)", len(charts) >= 5 and all(c.size["width"] > 100 for c in charts),
                  len(charts))
            check("the charts have titles and lines", len(driver.find_elements(By.CSS_SELECTOR, "div.charts svg title")) >= 5)
            settled(lambda: driver.find_element(By.CSS_SELECTOR, "form[action='/signout'] button").click())
            check("signing out returns to the sign-in page", driver.current_url.endswith("/signin"), driver.current_url)
            driver.get(server.base + "/v1/audit?format=html")
            check("after signing out the reports need a sign-in again", driver.current_url.endswith("/signin"), driver.current_url)
        finally:
            driver.quit()
        if not failures:
            server.keep = False
        else:
            print(f"logs kept in {server.workdir}")
    print(f"{'FAILED' if failures else 'passed'}: reports in a browser ({len(failures)} failures)", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
