"""Celery on pigeon: one message on a Celery queue that is not a kombu JSON envelope
(bytes put by another pigeon client, `pigeon put`, a `pigeon move` from the wrong queue,
a truncated body) kills every Celery worker that takes it.

celery/transport.py `Channel._take` runs `loads(message.body)` and `payload["properties"]`
outside any try: the JSONDecodeError / KeyError escapes `drain_events` and Celery ends the
worker with "Unrecoverable error" (exit 1). The message was taken unacked, so it goes back
to the queue with the dead connection and kills the next worker (or the restarted one),
until max_deliveries (20) moves it to `.dead`. Meanwhile the good tasks behind it do not
run. The Dramatiq adapter, for the same case, dead-letters the message as "undecodable"
and carries on (consumer.py `_proxy`).

Setup: `pigeon serve` on a random port; `b"not json"` put on the Celery queue, then one
good task; a `celery worker -P threads`. Expected: the bad message dead-lettered (or
dropped with a log line) and the good task run, the worker alive. Exit 1 while the worker
dies.
"""

import json
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


APP = '''
import json, os, time
from celery import Celery
import pigeon.integrations.celery
app = Celery("capp", broker="pigeon://127.0.0.1:%d//")
app.conf.update(task_default_queue="r6poison", broker_connection_retry_on_startup=True)
@app.task
def good():
    fd = os.open(os.environ["FW_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b'{"event": "good"}\\n')
    os.close(fd)
'''


def main():
    tmp = tempfile.mkdtemp(prefix="r6-poison-")
    port = free_port()
    log = os.path.join(tmp, "events.jsonl")
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
        subprocess.run([PY, "-c", f"import pigeon\nq = pigeon.Queue('pigeon://127.0.0.1:{port}/"
                        "r6poison', serializer='raw')\nq.put(b'not json')\nimport capp\n"
                        "capp.good.delay()"], env=env, cwd=tmp, check=True, timeout=60)
        wlog = os.path.join(tmp, "worker.log")
        w = subprocess.Popen([PY, "-m", "celery", "-A", "capp", "worker", "-P", "threads",
                              "--loglevel=INFO", "--without-heartbeat", "--without-gossip",
                              "--without-mingle"], env=env, cwd=tmp, stdout=open(wlog, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(w)
        dl = time.time() + 40
        ran = False
        while time.time() < dl and w.poll() is None:
            ran = os.path.exists(log) and "good" in open(log).read()
            if ran:
                break
            time.sleep(0.3)
        time.sleep(1)
        out = open(wlog).read()
        crash = [x for x in out.splitlines() if "Unrecoverable error" in x]
        print(f"worker exit code: {w.poll()}; good task ran: {ran}; "
              f"{crash[0] if crash else 'no unrecoverable error logged'}")
        if w.poll() is not None or not ran:
            print("DEFECT: a message that is not a kombu envelope kills the Celery worker "
                  "(and, given back unacked, the next one too); the good task behind it "
                  "did not run")
            sys.exit(1)
        print("ok: the worker survived the bad message and ran the good task")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
