"""r6_eng_engine_dedup_full: the engines' dedup memory. pigeon:// bounds it
(max_dedup_ids) and refuses a put with a new id beyond it rather than forget an id early.
What each engine must do: never forget an id before its window, memory bounded by the
window, a clear error when a bound is hit.

- redis:// keeps a key per id with PX = the window: bounded by the window. Found: on a
  server whose maxmemory-policy evicts (volatile-*, allkeys-*), those keys - the only
  pigeon keys with a ttl - are evicted first, and a repeat is stored (an id forgotten
  early, silently). Fixed: a dedup put there raises Unsupported, saying why.
- redis:// out of memory under noeviction: the put is refused whole; fixed to say so
  (Unavailable "redis is out of memory ... nothing was changed") instead of a generic
  PigeonError.
- nats:// keeps ids in JetStream's duplicate map, pruned after the window: bounded by it.
  Found: after a server restart JetStream rebuilds the map from the stored messages only,
  so the id of a message already acked (deleted from the work queue) was forgotten early
  and a repeat stored. Fixed: the ids are also kept in a per-queue key-value bucket (file
  storage, max age = the window), looked up before the publish and recorded after it.

Starts servers of its own (redis-server, nats-server). Exit 1 while a defect is there."""

import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pigeon

bad = []


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(argv: list[str], p: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{argv[0]} did not start")


def check(label: str, ok: bool) -> None:
    print(("ok   " if ok else "FAIL ") + label)
    if not ok:
        bad.append(label)


# 1. redis, an evicting maxmemory-policy
p = port()
proc = start(["redis-server", "--port", str(p), "--save", "", "--maxmemory", "3mb",
              "--maxmemory-policy", "volatile-lru"], p)  # fmt: skip
try:
    with pigeon.Queue(f"redis://127.0.0.1:{p}/r6full") as q:
        try:
            q.put("first", dedup_id="first")
            for i in range(60_000):
                try:
                    q.put(i, dedup_id=f"id-{i}-" + "k" * 40)
                except pigeon.PigeonError:
                    break  # out of memory once no key with a ttl is left
            before = q.qsize()
            try:
                q.put("first again", dedup_id="first")
            except pigeon.PigeonError:
                pass
            check(f"volatile-lru: the id 'first' still a repeat ({before} -> {q.qsize()})",
                  q.qsize() == before)
        except pigeon.Unsupported as exc:
            check(f"volatile-lru: a dedup put refused, saying why ({exc})", "maxmemory" in str(exc))
finally:
    proc.kill()
    proc.wait()

# 2. redis, noeviction, out of memory
p = port()
proc = start(["redis-server", "--port", str(p), "--save", "", "--maxmemory", "2mb",
              "--maxmemory-policy", "noeviction"], p)  # fmt: skip
try:
    with pigeon.Queue(f"redis://127.0.0.1:{p}/r6oom") as q:
        err: Exception | None = None
        for i in range(100_000):
            try:
                q.put(i, dedup_id=f"id-{i}")
            except pigeon.PigeonError as exc:
                err = exc
                break
        check(f"noeviction, full: Unavailable saying out of memory ({type(err).__name__}: {err})",
              isinstance(err, pigeon.Unavailable) and "out of memory" in str(err))
finally:
    proc.kill()
    proc.wait()

# 3. nats, an acked message's id across a server restart
p = port()
d = tempfile.mkdtemp()
argv = ["nats-server", "-a", "127.0.0.1", "-p", str(p), "-js", "-sd", d]
proc = start(argv, p)
try:
    url = f"nats://127.0.0.1:{p}/r6restart-{uuid.uuid4().hex[:6]}"
    with pigeon.Queue(url) as q:
        q.put("a", dedup_id="X")
        q.get(timeout=5)  # acked: deleted from the work-queue stream
    proc.terminate()
    proc.wait(20)
    proc = start(argv, p)
    with pigeon.Queue(url) as q:
        q.put("a again", dedup_id="X")
        check(f"nats: the id of an acked message survives a restart (qsize {q.qsize()})",
              q.qsize() == 0)
finally:
    proc.kill()
    proc.wait()
sys.exit(1 if bad else 0)
