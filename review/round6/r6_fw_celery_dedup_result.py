"""Celery on pigeon: `apply_async(dedup_id=...)` of a repeat returns an AsyncResult for a
task id that will never exist: `.get()` waits for ever (or until its timeout), `.ready()`
stays False, `.status` stays PENDING - nothing tells the caller its send was a repeat or
which task it repeated.

celery/mapping.py `put_options` passes the `dedup_id` property to the put, and the broker
confirms a repeat without storing it (docs/integrations/celery.md: "a repeat within the
queue's dedup window (300 s) is confirmed and not stored again"); `apply_async` has
already made a new task id and returns it. The first send's id is the only one that runs.
Same with taskiq's `dedup_id` label (`kiq()` returns a task whose `wait_result()` never
completes) and Dramatiq's `dedup_id` option with the Results middleware (by reading).

Setup: `pigeon serve` on a random port, a `celery worker -P threads` with the rpc://
result backend; `add.apply_async((1, 2), dedup_id="same")` twice. Expected: the second
result resolves (to the first task's result), or the send says it was a repeat. Exit 1
while the second `.get(timeout=8)` times out although the first returned 3.
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

APP = '''
from celery import Celery
import pigeon.integrations.celery
app = Celery("capp", broker="pigeon://127.0.0.1:%d//", backend="rpc://")
app.conf.update(task_default_queue="r6dedup", broker_connection_retry_on_startup=True)
@app.task
def add(x, y):
    return x + y
'''

CLIENT = '''
import capp
a = capp.add.apply_async((1, 2), dedup_id="same")
b = capp.add.apply_async((1, 2), dedup_id="same")
print("first:", a.get(timeout=15))
try:
    print("second:", b.get(timeout=8))
except Exception as exc:
    print("second: raised", type(exc).__name__, exc, "status", b.status)
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
    tmp = tempfile.mkdtemp(prefix="r6-dedup-")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(os.path.join(tmp, "capp.py"), "w") as f:
        f.write(APP % port)
    procs = []
    try:
        broker = subprocess.Popen([PY, "-m", "pigeon", "serve", "--port", str(port),
                                   "--data-dir", os.path.join(tmp, "data")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        procs.append(broker)
        wait_port(port)
        wlog = os.path.join(tmp, "worker.log")
        w = subprocess.Popen([PY, "-m", "celery", "-A", "capp", "worker", "-P", "threads",
                              "--loglevel=INFO", "--without-heartbeat", "--without-gossip",
                              "--without-mingle"], env=env, cwd=tmp, stdout=open(wlog, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(w)
        dl = time.time() + 60
        while " ready." not in open(wlog).read():
            if time.time() > dl or w.poll() is not None:
                print(open(wlog).read()[-2000:])
                sys.exit(2)
            time.sleep(0.2)
        r = subprocess.run([PY, "-c", CLIENT], env=env, cwd=tmp, capture_output=True,
                           text=True, timeout=60)
        print(r.stdout.strip(), r.stderr[-500:])
        if "first: 3" in r.stdout and "second: raised" in r.stdout:
            print("DEFECT: the deduplicated send returned a result handle that never resolves")
            sys.exit(1)
        print("ok")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
