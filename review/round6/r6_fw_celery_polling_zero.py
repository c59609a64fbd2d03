"""Celery on pigeon: `broker_transport_options={"polling_interval": 0}` (a setting carried
over from SQS/Redis configs, where it means "no sleep between long polls") makes an idle
worker consuming two or more queues spin: it and the broker each burn about half a core
doing non-waiting GETs, with no task in sight.

celery/transport.py `Transport.drain_events`: with several consumed queues it looks at
each without waiting, then parks `min(remaining, self.polling_interval)` on one; with 0 the
park is 0, so the loop never blocks. Nothing floors the option or warns about it.

Setup: `pigeon serve` on a random port; `celery worker -P solo -Q q0,q1` with
`polling_interval` 0, idle for 6 s. Expected: an idle worker uses next to no CPU (it does
with the default 0.1 s: ~0-2 %). Exit 1 while the idle worker uses > 15 % of a core.
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
app = Celery("capp", broker="pigeon://127.0.0.1:%d//")
app.conf.update(broker_connection_retry_on_startup=True,
                broker_transport_options={"polling_interval": 0})
@app.task
def t():
    pass
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


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    tmp = tempfile.mkdtemp(prefix="r6-poll-")
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
        w = subprocess.Popen([PY, "-m", "celery", "-A", "capp", "worker", "-P", "solo", "-Q",
                              "q0,q1", "--loglevel=INFO", "--without-heartbeat",
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
        time.sleep(1)
        a, b = cpu_seconds(w.pid), cpu_seconds(broker.pid)
        time.sleep(6)
        wa, ba = (cpu_seconds(w.pid) - a) / 6, (cpu_seconds(broker.pid) - b) / 6
        print(f"idle for 6 s: worker {100 * wa:.0f} % of a core, broker {100 * ba:.0f} %")
        if wa > 0.15:
            print("DEFECT: polling_interval=0 turns the multi-queue drain loop into a busy loop")
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
