"""pigeon:// broker: a queue's `unfinished` count (what task_done()/join() work on) does not
survive a restart - not kill -9, not even a graceful SIGTERM. After it, `unfinished` is the
number of messages the store holds: every item already taken but not yet marked done is
forgotten. So

- a producer's q.join() returns at once after the restart although the consumers never called
  task_done() for the items they took before it (queue.Queue: join "blocks until all items in
  the queue have been gotten and processed");
- a consumer that took an item before the restart and calls q.task_done() after it gets
  ValueError ("TASK_DONE beyond unfinished"), having done nothing wrong.

Nothing in the documents says the count is lost: README ("task_done, join, shutdown ... yes,
across clients"), protocol.md §4 ("every stored message adds one to the queue's unfinished;
TASK_DONE takes count off (an ACK does not)"), reliability.md (settings, the shut-down state and
dedup ids "survive a restart") - and a durable broker restarts under clients that keep running,
which is the point of reconnecting clients.

Suspected cause: server/core/recovery.py sets `q.unfinished += 1` per recovered message;
nothing stores the count of taken-but-not-done items (no record kind for TASK_DONE). The model
(tests/server/_reference.py `Model.restart`) encodes the same rule, so the crash tests agree
with it.

Run: python r6_nemesis_unfinished_restart.py   (exit 1 while the defect is present; ~10 s)
"""
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pigeon


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(port, data):
    p = subprocess.Popen([sys.executable, "-m", "pigeon", "serve", "--port", str(port), "--data-dir", data,
                          "--fsync", "always"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return p
        except OSError:
            time.sleep(0.025)
    raise RuntimeError("the broker did not start")


def main():
    port = free_port()
    data = tempfile.mkdtemp(prefix="r6unf-")
    bad = []
    broker = start(port, data)
    try:
        for how in (signal.SIGKILL, signal.SIGTERM):
            name = f"jobs-{how.name}"
            url = f"pigeon://127.0.0.1:{port}/{name}"
            producer, consumer = pigeon.Queue(url), pigeon.Queue(url)
            for i in range(3):
                producer.put(i)
            taken = [consumer.get() for _ in range(3)]  # taken (acked), not yet processed
            consumer.task_done()  # one of three processed
            before = producer._info()["unfinished"]
            broker.send_signal(how)
            broker.wait(30)
            broker = start(port, data)
            after = producer._info()["unfinished"]
            t = time.monotonic()
            try:
                producer.join(timeout=2)
                joined = f"returned after {time.monotonic() - t:.2f} s"
            except TimeoutError:
                joined = "timed out (2 tasks unfinished)"
            try:
                consumer.task_done()
                done = "ok"
            except Exception as e:
                done = f"{type(e).__name__}: {e}"
            print(f"{how.name}: took {taken}, 1 task_done; unfinished {before} before the restart, {after} after")
            print(f"   join(timeout=2) {joined}; the consumer's next task_done() -> {done}")
            if after != before:
                bad.append(how.name)
            producer.close()
            consumer.close()
    finally:
        broker.kill()
        broker.wait()
        shutil.rmtree(data, ignore_errors=True)
    if bad:
        print(f"DEFECT: the unfinished count was lost across a restart ({', '.join(bad)})")
        sys.exit(1)
    print("ok: unfinished survives a restart")


if __name__ == "__main__":
    main()
