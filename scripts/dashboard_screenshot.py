"""Render the dashboard into docs/img/dashboard.png (for the README).

Run:  python scripts/dashboard_screenshot.py [--seconds 30]

Starts a broker with --http on free loopback ports, runs a little traffic through a few
queues (a producer, a consumer, a dead letter), lets the chart fill for --seconds, and
takes a screenshot with headless Chromium (Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import threading
import time
from pathlib import Path

import pigeon
from pigeon.testing.broker import BrokerThread

OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "dashboard.png"


def traffic(broker: BrokerThread, stop: threading.Event) -> None:
    jobs = pigeon.Queue(broker.url("jobs"), max_deliveries=2)
    emails = pigeon.Queue(broker.url("emails"))
    i = 0
    while not stop.is_set():
        jobs.put_many([{"job": i + k} for k in range(20)])
        emails.put({"to": f"user{i}@example.com"})
        for _ in range(15):
            with contextlib.suppress(pigeon.Empty):
                msg = jobs.get_message(timeout=0.01)
                if msg.body["job"] % 97 == 0:
                    msg.nack()  # a poison job, dead-lettered after two tries
                else:
                    msg.ack()
        i += 20
        time.sleep(0.05)
    jobs.close()
    emails.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        sys.exit(
            "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    with BrokerThread(http="127.0.0.1:0") as broker:
        stop = threading.Event()
        t = threading.Thread(target=traffic, args=(broker, stop))
        t.start()
        idle = pigeon.Queue(broker.url("reports"))
        idle.put_many(range(7))
        time.sleep(args.seconds)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,860",
                     "--disable-background-networking", "--no-first-run"):  # fmt: skip
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(driver), options=options)
        try:
            browser.get(broker.http_url)
            time.sleep(3)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(OUT))
        finally:
            browser.quit()
            stop.set()
            t.join()
            idle.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
