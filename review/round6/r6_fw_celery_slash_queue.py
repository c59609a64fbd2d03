"""Celery on pigeon: a Celery queue whose name contains "/" (`reports/daily`, legal on
RabbitMQ and Redis, and a legal pigeon queue name: "1 to 200 printable characters, no
whitespace", protocol/rules.py) cannot be used, and the error names the wrong problem.

celery/mapping.py `queue_url` percent-encodes the name into a pigeon:// URL
(`.../reports%2Fdaily`), and backends/_url.py `QueueURL` unquotes the path and refuses any
"/" in it: "'pigeon://127.0.0.1:P/reports%2Fdaily' names no queue: write
pigeon://127.0.0.1:P/QUEUE". `apply_async` raises kombu's OperationalError with that text;
a worker started with `-Q reports/daily` dies at start with "Unrecoverable error:
InvalidURL(...names no queue...)". The URL it quotes does name a queue.

Setup: `pigeon serve` on a random port; `apply_async(queue="reports/daily")`.
Expected: the task is stored on pigeon queue "reports/daily" (or an error saying "/" is
not allowed in a queue name). Exit 1 while the send fails with "names no queue".
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PY = sys.executable

CLIENT = '''
from celery import Celery
import pigeon.integrations.celery
app = Celery("capp", broker="pigeon://127.0.0.1:%d//")
@app.task
def t():
    pass
try:
    t.apply_async(queue="reports/daily")
    print("SENT")
except Exception as exc:
    print("RAISED", type(exc).__name__, exc)
'''


def free_port():
    while True:
        p = random.randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                pass


def wait_port(port, timeout=20):
    dl = time.time() + timeout
    while time.time() < dl:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("broker did not start")


def main():
    tmp = tempfile.mkdtemp(prefix="r6-slash-")
    port = free_port()
    broker = subprocess.Popen([PY, "-m", "pigeon", "serve", "--port", str(port), "--data-dir",
                               os.path.join(tmp, "data")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        r = subprocess.run([PY, "-c", CLIENT % port], capture_output=True, text=True,
                           timeout=60)
        print(r.stdout.strip(), r.stderr[-300:])
        if "names no queue" in r.stdout:
            print("DEFECT: a legal queue name with '/' is refused, with an error that says the "
                  "URL names no queue")
            sys.exit(1)
        print("ok")
    finally:
        os.killpg(broker.pid, signal.SIGKILL)
        broker.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
