"""The nemesis's client processes: ``python -m tests.faults._nemesis_clients ROLE ...``.

Each process binds its own source address (``--source``, an address of the host's end of
the veth) so the nemesis can cut it off alone, and writes what it does to its own log, one
``os.write`` per record on an ``O_APPEND`` file: a record written is in the kernel's page
cache, so a process SIGKILLed a moment later has not lost it. A record is

    <time.monotonic()> <kind> [<fields>...]

- ``a ID`` attempted (before the call), ``k ID`` acknowledged write (the call returned),
  ``i ID ERROR`` indeterminate (the call raised: the write may or may not be stored);
- ``d ID COUNT`` delivered (before it is settled; COUNT is the delivery count, 0 from a
  plain ``get``), ``s ID`` acked, ``f ID ERROR`` the ack failed, ``n ID`` nacked;
- ``e`` a get found nothing before its timeout (the consumer is working), ``x OP ERROR`` a
  get raised a pigeon error;
- ``o OP SECONDS TIMEOUT`` a call overran its timeout by more than ``OVERRUN_SLACK``;
- ``F OP ERROR`` an exception outside ``pigeon.PigeonError`` came out of a call.

Ids are ``<letter><incarnation>.<n>``; the letter names the producer (``P`` put, ``M``
put_many, ``D`` put with dedup_id, ``B`` put_many with dedup_ids, ``A`` AsyncQueue), and
``D``/``B`` ids are their own dedup ids. Producers stop when ``RUN_DIR/stop-producers``
exists, consumers when ``RUN_DIR/stop-consumers`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout

import pigeon

OVERRUN_SLACK = 2.0
DEDUP_LETTERS = "DB"
ATTEMPTS = 5  # a dedup producer retries one id this many times


class Log:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, kind: str, *fields: object) -> None:
        line = " ".join([f"{time.monotonic():.3f}", kind, *map(str, fields)])
        os.write(self.fd, (line + "\n").encode())


class Client:
    """What every role shares: its log, its ids, when to stop, how to time a call."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.log = Log(args.log)
        self.url = args.url
        self.prefix = args.prefix
        self.stop_file = Path(args.run_dir) / f"stop-{args.group}"
        self.pace = args.pace
        self.source = args.source
        self.rng = random.Random(args.seed)
        self._n = 0

    def next_id(self) -> str:
        self._n += 1
        return f"{self.prefix}.{self._n}"

    def stopping(self) -> bool:
        return self.stop_file.exists()

    def timed(self, op: str, timeout: float | None, started: float) -> None:
        took = time.monotonic() - started
        if timeout is not None and took > timeout + OVERRUN_SLACK:
            self.log("o", op, f"{took:.1f}", timeout)

    def foreign(self, op: str, exc: BaseException) -> None:
        self.log("F", op, f"{type(exc).__name__}:{str(exc)[:200]!r}")


def err(exc: BaseException) -> str:
    return type(exc).__name__


def write(
    c: Client, op: str, ids: list[str], call: Callable[[], Any], timeout: float | None
) -> bool:
    """One write call: attempted, then acknowledged or indeterminate."""
    for i in ids:
        c.log("a", i)
    t = time.monotonic()
    try:
        call()
    except pigeon.PigeonError as exc:
        c.timed(op, timeout, t)
        for i in ids:
            c.log("i", i, err(exc))
        return False
    except Exception as exc:
        c.foreign(op, exc)
        for i in ids:
            c.log("i", i, err(exc))
        return False
    c.timed(op, timeout, t)
    for i in ids:
        c.log("k", i)
    return True


# --- producers ------------------------------------------------------------------------------


def put(c: Client) -> None:
    """Blocking ``put`` with no timeout."""
    with pigeon.Queue(c.url) as q:
        while not c.stopping():
            i = c.next_id()
            write(c, "put", [i], lambda i=i: q.put(i), None)
            time.sleep(c.pace)


def put_many(c: Client) -> None:
    """``put_many`` batches of 10, timeout 8 s."""
    with pigeon.Queue(c.url) as q:
        while not c.stopping():
            ids = [c.next_id() for _ in range(10)]
            write(c, "put_many", ids, lambda ids=ids: q.put_many(ids, timeout=8), 8)
            time.sleep(c.pace * 10)


def put_dedup(c: Client) -> None:
    """``put(dedup_id=id)``, timeout 6 s; a put that raised is retried with the same id."""
    with pigeon.Queue(c.url) as q:
        while not c.stopping():
            i = c.next_id()
            for _ in range(ATTEMPTS):
                if write(c, "put_dedup", [i], lambda i=i: q.put(i, dedup_id=i, timeout=6), 6):
                    break
            time.sleep(c.pace)


def put_many_dedup(c: Client) -> None:
    """``put_many(dedup_ids=ids)`` batches of 5, timeout 8 s, retried with the same ids."""
    with pigeon.Queue(c.url) as q:
        while not c.stopping():
            ids = [c.next_id() for _ in range(5)]

            def call(ids: list[str] = ids) -> None:
                q.put_many(ids, dedup_ids=ids, timeout=8)

            for _ in range(ATTEMPTS):
                if write(c, "put_many_dedup", ids, call, 8):
                    break
            time.sleep(c.pace * 5)


async def aput(c: Client) -> None:
    """An ``AsyncQueue`` with 8 coroutines putting at once, timeout 10 s."""
    async with pigeon.AsyncQueue(c.url) as q:

        async def one() -> None:
            while not c.stopping():
                i = c.next_id()
                await awrite(c, "aput", i, q.put(i, timeout=10), 10)
                await asyncio.sleep(c.pace * 8)

        await asyncio.gather(*(one() for _ in range(8)))


async def awrite(c: Client, op: str, i: str, call: Awaitable[Any], timeout: float) -> None:
    c.log("a", i)
    t = time.monotonic()
    try:
        await call
    except pigeon.PigeonError as exc:
        c.log("i", i, err(exc))
    except Exception as exc:
        c.foreign(op, exc)
        c.log("i", i, err(exc))
    else:
        c.log("k", i)
    c.timed(op, timeout, t)


# --- consumers ------------------------------------------------------------------------------


def settle(c: Client, msg: Any, nack: bool = False) -> None:
    try:
        if nack:
            msg.nack()
            c.log("n", msg.body)
        else:
            msg.ack()
            c.log("s", msg.body)
    except pigeon.PigeonError as exc:
        c.log("f", msg.body, err(exc))
    except Exception as exc:
        c.foreign("ack", exc)
        c.log("f", msg.body, err(exc))


def take(c: Client, op: str, call: Callable[[], Any], timeout: float) -> Any:
    """One get call: what it returned, or None (after logging why) if it raised."""
    t = time.monotonic()
    try:
        return call()
    except pigeon.Empty:
        c.log("e")
    except pigeon.PigeonError as exc:
        c.log("x", op, err(exc))
        time.sleep(0.1)
    except Exception as exc:
        c.foreign(op, exc)
        time.sleep(0.1)
    finally:
        c.timed(op, timeout, t)
    return None


def get_message(c: Client, slow: bool = False) -> None:
    """``get_message(timeout=2)`` + ``ack``; ``slow``: pauses up to 2 s before it settles,
    and nacks 5 % of the messages."""
    with pigeon.Queue(c.url) as q:
        while not c.stopping():
            msg = take(c, "get_message", lambda: q.get_message(timeout=2), 2)
            if msg is None:
                continue
            c.log("d", msg.body, msg.delivery_count)
            if slow:
                time.sleep(c.rng.uniform(0, 2))
            settle(c, msg, nack=slow and c.rng.random() < 0.05)


def get_plain(c: Client) -> None:
    """Plain ``get(timeout=2)`` and ``get_many(10, timeout=2)`` in turn (they ack on
    receipt, without waiting: this consumer is never killed)."""
    with pigeon.Queue(c.url) as q:
        many = False
        while not c.stopping():
            many = not many
            if many:
                got = take(c, "get_many", lambda: q.get_many(10, timeout=2), 2)
            else:
                one = take(c, "get", lambda: q.get(timeout=2), 2)
                got = None if one is None else [one]
            for body in got or []:
                c.log("d", body, 0)


async def aget_message(c: Client) -> None:
    """An ``AsyncQueue`` with 3 coroutines taking with ``get_message(timeout=2)`` and acking;
    the first is cancelled at random (``asyncio.timeout`` of 0.3-3 s around the call), so
    replies also arrive for calls already given up (the client must hand them back)."""
    async with pigeon.AsyncQueue(c.url) as q:

        async def one(cancel: bool) -> None:
            while not c.stopping():
                t = time.monotonic()
                limit = asyncio.timeout(c.rng.uniform(0.3, 3) if cancel else None)
                try:
                    async with limit:
                        msg = await q.get_message(timeout=2)
                except TimeoutError as exc:
                    if not limit.expired():
                        c.foreign("aget_message", exc)
                    continue  # cancelled: the call is withdrawn, or its message handed back
                except pigeon.Empty:
                    c.log("e")
                    continue
                except pigeon.PigeonError as exc:
                    c.log("x", "aget_message", err(exc))
                    await asyncio.sleep(0.1)
                    continue
                except Exception as exc:
                    c.foreign("aget_message", exc)
                    await asyncio.sleep(0.1)
                    continue
                finally:
                    c.timed("aget_message", 2, t)
                c.log("d", msg.body, msg.delivery_count)
                try:
                    await msg.ack()
                    c.log("s", msg.body)
                except pigeon.PigeonError as exc:
                    c.log("f", msg.body, err(exc))
                except Exception as exc:
                    c.foreign("aack", exc)
                    c.log("f", msg.body, err(exc))

        await asyncio.gather(one(True), one(False), one(False))


ROLES: dict[str, tuple[str, Callable[[Client], Any]]] = {
    # role: (id letter, what it runs)
    "put": ("P", put),
    "put_many": ("M", put_many),
    "put_dedup": ("D", put_dedup),
    "put_many_dedup": ("B", put_many_dedup),
    "aput": ("A", lambda c: asyncio.run(bound_async(c, aput))),
    "get_message": ("", get_message),
    "get_message_slow": ("", functools.partial(get_message, slow=True)),
    "get": ("", get_plain),
    "aget_message": ("", lambda c: asyncio.run(bound_async(c, aget_message))),
}
PRODUCERS = ("put", "put_many", "put_dedup", "put_many_dedup", "aput")
CONSUMERS = ("get_message", "get_message_slow", "get", "aget_message")


def bind_source(address: str) -> None:
    """Every blocking connection this process opens leaves from ``address``."""
    socket.create_connection = functools.partial(  # type: ignore[assignment]
        socket.create_connection, source_address=(address, 0)
    )


async def bound_async(c: Client, role: Callable[[Client], Awaitable[None]]) -> None:
    """Run an asyncio role with its loop's connections leaving from ``--source``."""
    loop = asyncio.get_running_loop()
    loop.create_connection = functools.partial(  # type: ignore[method-assign]
        loop.create_connection, local_addr=(c.source, 0)
    )
    await role(c)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--url", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prefix", default="")
    p.add_argument("--pace", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.group = "producers" if args.role in PRODUCERS else "consumers"
    # Die with the nemesis: no client may outlive the link it was cut off on.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the nemesis died before that took effect
        return
    bind_source(args.source)
    ROLES[args.role][1](Client(args))


if __name__ == "__main__":
    main()
