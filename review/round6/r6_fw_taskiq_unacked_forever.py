"""taskiq on pigeon: a message the taskiq worker does not run - a task name it does not
know (a rolling deploy: the task exists only in the new code), or bytes it cannot parse -
is held by that worker for ever: never acked, its lease extended for as long as the worker
lives, so it is never given to a worker that knows the task, never dead-lettered.

taskiq's Receiver.callback returns without acking such a message ("task ... is not
found", "Cannot parse message ... Skipping execution"). PigeonBroker.listen() puts every
message it yields into the LeaseKeeper (`self._keeper.hold(msg)`), and only the ack
releases it (`_acker`), so the keeper extends it every half lease, indefinitely. The
docs (docs/integrations/taskiq.md): the lease "bounds only a worker whose event loop is
stuck"; here it bounds nothing. (taskiq-redis' RedisStreamBroker reclaims such a message
after idle_timeout; the pigeon Dramatiq adapter dead-letters an undecodable one.)

Setup: `pigeon serve` on a random port; an old worker (lease 2 s) that knows only
`known`; a task `newtask` (registered in the new code only) and b"garbage" kicked; then a
new worker that knows `newtask`. Expected: within a few leases `newtask` runs on the new
worker (or the two messages are dead-lettered). Exit 1 while both stay in flight on the
old worker and `newtask` never runs.
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

OLD = '''
import json, os, time
from pigeon.integrations.taskiq import PigeonBroker
broker = PigeonBroker("pigeon://127.0.0.1:%d/r6tq", lease=2)
def record(event):
    fd = os.open(os.environ["FW_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps({"event": event}) + "\\n").encode())
    os.close(fd)
@broker.task
async def known():
    record("known")
'''
NEW = '''
from old import broker, record
@broker.task
async def newtask():
    record("newtask")
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
    tmp = tempfile.mkdtemp(prefix="r6-tq-")
    port = free_port()
    log = os.path.join(tmp, "events.jsonl")
    env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FW_LOG": log}
    with open(os.path.join(tmp, "old.py"), "w") as f:
        f.write(OLD % port)
    with open(os.path.join(tmp, "new.py"), "w") as f:
        f.write(NEW)
    procs = []

    def spawn(argv, name):
        p = subprocess.Popen(argv, env=env, cwd=tmp, stdout=open(os.path.join(tmp, name), "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def ready(name):
        dl = time.time() + 40
        while time.time() < dl:
            if "Listening started" in open(os.path.join(tmp, name)).read():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not start")

    def stats():
        r = subprocess.run([PY, "-c", f"import pigeon, json\nq = pigeon.Queue('pigeon://127.0.0.1:"
                            f"{port}/r6tq', serializer='raw')\nprint(json.dumps(q.stats()"
                            "['queues']['r6tq']))"], env=env, cwd=tmp, capture_output=True,
                           text=True, timeout=30)
        return json.loads(r.stdout)

    try:
        spawn([PY, "-m", "pigeon", "serve", "--port", str(port), "--data-dir",
               os.path.join(tmp, "data")], "broker.log")
        wait_port(port)
        spawn([PY, "-m", "taskiq", "worker", "old:broker", "--workers", "1"], "old.log")
        ready("old.log")
        subprocess.run([PY, "-c", "import asyncio, new, pigeon\nasync def main():\n"
                        "    await new.broker.startup()\n    await new.newtask.kiq()\n"
                        "    await new.broker.shutdown()\nasyncio.run(main())\n"
                        f"pigeon.Queue('pigeon://127.0.0.1:{port}/r6tq', serializer='raw')"
                        ".put(b'garbage')"], env=env, cwd=tmp, check=True, timeout=60)
        time.sleep(2)
        spawn([PY, "-m", "taskiq", "worker", "new:broker", "--workers", "1"], "new.log")
        ready("new.log")
        time.sleep(12)  # six leases of 2 s
        s = stats()
        ran = os.path.exists(log) and "newtask" in open(log).read()
        old = open(os.path.join(tmp, "old.log")).read()
        print(f"after 6 leases: in_flight={s['in_flight']} dead={s['dead_total']} "
              f"redelivered={s['redelivered_total']} newtask ran: {ran}; old worker said "
              f"'not found': {'is not found' in old}, 'Cannot parse': {'Cannot parse' in old}")
        if not ran and s["in_flight"] >= 1:
            print("DEFECT: the messages the old worker skipped stay in flight on it, their "
                  "leases extended for ever: never redelivered, never dead-lettered")
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
