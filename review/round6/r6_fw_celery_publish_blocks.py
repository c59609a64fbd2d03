"""Celery on pigeon: `apply_async` blocks ~30 s when the broker is down, whatever the
app's publish retry policy says (`task_publish_retry=False` included).

celery/transport.py `Channel._queue` opens each queue handle with pigeon.Queue's default
`reconnect_timeout` (30 s) and `Channel._put` calls `put()` without a timeout, so a put on
a handle whose connection is gone retries the connection for 30 s before it raises;
kombu's retry policy (`task_publish_retry`, `task_publish_retry_policy`: Celery's default
gives up after 3 quick retries) and `broker_connection_timeout` never reach it. With
Redis the same app raises at once (measured: 0.6 s with the default policy, 0.0 s with
`task_publish_retry=False`). A web request that sends a task during a broker restart
hangs 30 s - gunicorn's default worker timeout - instead of failing fast to its error
handler. (Dramatiq's `enqueue` and taskiq's `kiq()` use the same default, by reading.)

Setup: `pigeon serve` on a random port; a producer with `task_publish_retry=False` sends
once (connected), the broker is SIGKILLed, the producer sends again.
Expected: the second send raises within a few seconds. Exit 1 while it takes > 10 s.
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
import os, signal, time
from celery import Celery
import pigeon.integrations.celery
app = Celery("capp", broker="pigeon://127.0.0.1:%d//")
app.conf.update(task_default_queue="r6publish", task_publish_retry=False)
@app.task
def t():
    pass
t.delay()
os.killpg(%d, signal.SIGKILL)   # the broker goes away
time.sleep(1)
start = time.time()
try:
    t.delay()
    print("SECOND SEND RETURNED", round(time.time() - start, 1))
except Exception as exc:
    print("SECOND SEND RAISED", round(time.time() - start, 1), type(exc).__name__, exc)
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
    tmp = tempfile.mkdtemp(prefix="r6-publish-")
    port = free_port()
    broker = subprocess.Popen([PY, "-m", "pigeon", "serve", "--port", str(port), "--data-dir",
                               os.path.join(tmp, "data")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        r = subprocess.run([PY, "-c", CLIENT % (port, broker.pid)], capture_output=True,
                           text=True, timeout=120)
        print(r.stdout.strip(), r.stderr[-300:])
        took = float(r.stdout.split("SECOND SEND ")[1].split()[1])
        if took > 10:
            print(f"DEFECT: with task_publish_retry=False the send blocked {took} s before "
                  "raising (Redis: at once)")
            sys.exit(1)
        print("ok")
    finally:
        if broker.poll() is None:
            os.killpg(broker.pid, signal.SIGKILL)
        broker.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
