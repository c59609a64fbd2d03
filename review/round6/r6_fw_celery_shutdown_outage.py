"""Celery on pigeon: a warm shutdown while the broker is unreachable takes ~30 s per
prefetched task (minutes for a normal prefetch window), though nothing it does can help.

On channel close kombu calls `QoS.restore_unacked()` (celery/qos.py), which gives back
every held delivery one by one with `message.nack(True)`: a call with no timeout, so the
blocking client retries the connection for its whole `reconnect_timeout` (30 s) for each
message before `_settle` logs "could not give back a task message" and goes to the next.
The comment in that method says it already: "the broker gives them back when the
connection closes anyway". A worker stopped during a broker outage (a node drain, a
namespace restart, `systemctl stop` while the broker host reboots) outlives any sane grace
period and is SIGKILLed; Celery's own reconnect after a connection loss is held up the
same way (the old channel is closed first).

Setup: `pigeon serve` on a random port; `celery worker -P threads -c 2` with Celery's
default prefetch multiplier (4: the worker holds 8 deliveries, 2 running, 6 waiting),
40 tasks of 2 s; the broker SIGKILLed, then SIGTERM (warm shutdown) to the worker.
Expected: the worker exits once its 2 running tasks end (a few seconds). Exit 1 while it
is still running 45 s later.
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
import os, time
from celery import Celery
import pigeon.integrations.celery
app = Celery("capp", broker="pigeon://127.0.0.1:%d//")
app.conf.update(task_default_queue="r6outage", broker_connection_retry_on_startup=True)
@app.task
def slow(i):
    fd = os.open(os.environ["FW_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"start\\n")
    os.close(fd)
    time.sleep(2)
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
    tmp = tempfile.mkdtemp(prefix="r6-outage-")
    port = free_port()
    log = os.path.join(tmp, "events")
    env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FW_LOG": log}
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
                              "-c", "2", "--loglevel=INFO", "--without-heartbeat",
                              "--without-gossip", "--without-mingle"], env=env, cwd=tmp,
                             stdout=open(wlog, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(w)
        dl = time.time() + 60
        while " ready." not in open(wlog).read():
            if time.time() > dl or w.poll() is not None:
                print(open(wlog).read()[-2000:])
                sys.exit(2)
            time.sleep(0.2)
        subprocess.run([PY, "-c", "import capp\nfor i in range(40): capp.slow.delay(i)"],
                       env=env, cwd=tmp, check=True, timeout=60)
        dl = time.time() + 30
        while time.time() < dl and (not os.path.exists(log) or open(log).read().count("start") < 2):
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(broker.pid, signal.SIGKILL)  # the broker goes away...
        broker.wait()
        t = time.time()
        os.kill(w.pid, signal.SIGTERM)  # ...and the worker is asked to stop (warm)
        try:
            w.wait(45)
        except subprocess.TimeoutExpired:
            pass
        took = time.time() - t
        gave_back = open(wlog).read().count("could not give back")
        print(f"worker {'exited' if w.poll() is not None else 'STILL RUNNING'} {took:.1f} s "
              f"after SIGTERM; 'could not give back' warnings so far: {gave_back}")
        if w.poll() is None:
            print("DEFECT: the warm shutdown spends reconnect_timeout (30 s) on each held "
                  "delivery it tries to give back to a broker that is down")
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
