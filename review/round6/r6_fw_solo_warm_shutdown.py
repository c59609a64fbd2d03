"""Celery on pigeon: a warm shutdown (SIGTERM) of a `-P solo` worker takes one more task
from the broker and runs it to the end before exiting.

On pigeon the transport is synchronous (`implements.asynchronous = False`), so Celery runs
its fallback `synloop`, whose loop is `try: state.maybe_shutdown() finally: _loop_cycle()`:
after the shutdown flag is set the `finally` still runs one `drain_events`, and the
transport hands the next message to the solo pool, which runs it synchronously (with the
default early ack it is acked as it starts). On Redis (asynloop) the same worker exits
after the task in hand and leaves the next one queued. A worker told to stop starts new
work: the shutdown takes a whole extra task, and a supervisor's SIGKILL after its grace
period loses that (already acked) task.

Setup: `pigeon serve` on a random port, one `celery worker -P solo -c 1` (defaults: early
ack, prefetch 4 -> set to 1), two 4 s tasks; SIGTERM to the worker while task 0 runs.
Expected: the worker exits after task 0; task 1 stays queued. Exit 1 while task 1 is
started by the stopping worker.
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


def events(path):
    try:
        with open(path) as f:
            return [json.loads(x) for x in f if x.strip()]
    except FileNotFoundError:
        return []


APP = '''
import json, os, time
from celery import Celery
import pigeon.integrations.celery
def record(event, **f):
    fd = os.open(os.environ["FW_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps({"event": event, "t": time.time(), **f}) + "\\n").encode())
    os.close(fd)
app = Celery("capp", broker="pigeon://127.0.0.1:%d//")
app.conf.update(task_default_queue="r6-solo-%d", worker_prefetch_multiplier=1,
                broker_connection_retry_on_startup=True)
@app.task
def slow(i, d):
    record("start", i=i)
    time.sleep(d)
    record("end", i=i)
'''


def main():
    tmp = tempfile.mkdtemp(prefix="r6-solo-")
    port = free_port()
    log = os.path.join(tmp, "events.jsonl")
    env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FW_LOG": log}
    with open(os.path.join(tmp, "capp.py"), "w") as f:
        f.write(APP % (port, port))
    procs = []
    try:
        broker = subprocess.Popen([PY, "-m", "pigeon", "serve", "--port", str(port),
                                   "--data-dir", os.path.join(tmp, "data")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        procs.append(broker)
        wait_port(port)
        wlog = open(os.path.join(tmp, "worker.log"), "w")
        w = subprocess.Popen([PY, "-m", "celery", "-A", "capp", "worker", "-P", "solo",
                              "--loglevel=INFO", "--without-heartbeat", "--without-gossip",
                              "--without-mingle"], env=env, cwd=tmp, stdout=wlog,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(w)
        dl = time.time() + 60
        while " ready." not in open(wlog.name).read():
            if time.time() > dl or w.poll() is not None:
                print(open(wlog.name).read()[-2000:])
                sys.exit(2)
            time.sleep(0.2)
        subprocess.run([PY, "-c", "import capp\nfor i in range(2): capp.slow.delay(i, 4)"],
                       env=env, cwd=tmp, check=True, timeout=60)
        dl = time.time() + 30
        while not any(e["event"] == "start" for e in events(log)) and time.time() < dl:
            time.sleep(0.1)
        time.sleep(0.5)
        t_term = time.time()
        os.kill(w.pid, signal.SIGTERM)  # warm shutdown, to the main process, as Celery asks
        try:
            w.wait(40)
        except subprocess.TimeoutExpired:
            pass
        took = time.time() - t_term
        ev = events(log)
        late = [e for e in ev if e["event"] == "start" and e["t"] > t_term]
        print(f"worker exited {took:.1f} s after SIGTERM; tasks started after SIGTERM: "
              f"{[e['i'] for e in late]}; events: {[(e['event'], e['i']) for e in ev]}")
        if late:
            print("DEFECT: the solo worker, told to stop, took a new task from the broker and "
                  "ran it before exiting (Redis' transport: it exits after the task in hand)")
            sys.exit(1)
        print("ok: the stopping worker took no new task")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
