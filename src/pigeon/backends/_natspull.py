"""Pull requests to a stream's durable consumers, each answered on an inbox of its own.

# Strategy:
# nats-py's ``PullSubscription.fetch`` binds one consumer to one inbox and, when its
# client-side timeout ends first, leaves a request behind that the server may still fill -
# a message then sits leased to nobody who reads it until AckWait. Here the requests of a
# connection share one wildcard subscription: a status answer (404 nothing now, 408 the
# request expired) comes on the request's own inbox, a delivery under its own subject
# with an ack subject that names its consumer - so the pulls of one consumer take turns
# on a connection, and each is read until the server's own answer ends it (its batch, or
# a status). A wait ends with the server's word, not before it; a delivery that arrives
# for a request given up anyway (the connection stalled) is kept and handed out by the
# next pull of that consumer rather than left to time out.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from pigeon.errors import PigeonError

__all__ = ["ANSWER_GRACE", "ConsumerMissing", "Pulls", "asked_at"]

ANSWER_GRACE = 1.0  # seconds past a request's expiry its last answer may still be on the way
_ENDS = ("404", "408")  # nothing (more) now; the request expired or its batch ran out
_HEARTBEAT = "100"


class ConsumerMissing(PigeonError):
    """No consumer answered the pull (503 no responders): it does not exist (yet)."""


def _status(msg: Any) -> tuple[str, str] | None:
    """A status message's code and description; None for a message of the stream."""
    headers = msg.headers
    if msg.data or not headers:
        return None
    code = headers.get("Status")
    if code is None:
        return None
    return str(code), str(headers.get("Description", ""))


def asked_at(msg: Any) -> float:
    """When (``time.monotonic()``) the pull that brought ``msg`` was sent: JetStream
    delivered it later, so its AckWait ends no sooner than this plus AckWait."""
    return float(getattr(msg, "_pigeon_asked", time.monotonic()))


def _durable_of(reply: str) -> str:
    """The consumer a delivery came from: ``$JS.ACK.<stream>.<consumer>.<...>``."""
    parts = reply.split(".")
    return parts[3] if len(parts) > 4 and parts[:2] == ["$JS", "ACK"] else ""


class Pulls:
    """Pull requests of one connection to the consumers of ``stream``."""

    def __init__(self, nc: Any, stream: str) -> None:
        self._nc = nc
        self._stream = stream
        self._prefix = nc.new_inbox()
        self._sub: Any = None
        self._waiting: dict[str, asyncio.Queue[Any]] = {}  # inbox -> its answers
        self._reading: dict[str, asyncio.Queue[Any]] = {}  # consumer -> the pull's answers
        self._turns: dict[str, asyncio.Lock] = {}  # consumer -> one pull at a time
        # consumer -> (when it came, delivery): taken but not handed out yet
        self._stray: dict[str, list[tuple[float, Any]]] = {}
        self._asked: dict[str, float] = {}  # consumer -> when its last pull was sent
        self._count = 0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._route)

    async def _route(self, msg: Any) -> None:
        if _status(msg) is not None:
            waiting = self._waiting.get(msg.subject)
            if waiting is not None:
                waiting.put_nowait(msg)
            return
        durable = _durable_of(msg.reply or "")
        if not hasattr(msg, "_pigeon_asked"):  # (routed again: stamped the first time)
            msg._pigeon_asked = self._asked.get(durable, time.monotonic())
        reading = self._reading.get(durable)
        if reading is not None:
            reading.put_nowait(msg)
        else:
            self._stray.setdefault(durable, []).append((time.monotonic(), msg))

    async def pull(self, durable: str, n: int, wait: float, fresh: float = 10.0) -> list[Any]:
        """Up to ``n`` messages of consumer ``durable``: those there now (``wait`` 0), or
        waiting up to ``wait`` seconds for the first. Deliveries kept from earlier come
        first; one kept longer than ``fresh`` seconds (its lease may have ended and handed
        it to another consumer) is given back instead. Raises ``ConsumerMissing``."""
        async with self._turns.setdefault(durable, asyncio.Lock()):
            kept = self._stray.pop(durable, [])
            now = time.monotonic()
            for _, msg in [(t, m) for t, m in kept if now - t > fresh]:
                await msg.nak()
            kept = [(t, m) for t, m in kept if now - t <= fresh]
            if kept:
                if kept[n:]:
                    self._stray[durable] = kept[n:]
                return [m for _, m in kept[:n]]
            return await self._request(durable, n, wait)

    def keep(self, durable: str, msgs: list[Any]) -> None:
        """Deliveries taken but not handed out now: the next pull of ``durable`` hands
        them out first."""
        now = time.monotonic()
        self._stray[durable] = [*((now, m) for m in msgs), *self._stray.get(durable, [])]

    def kept(self) -> list[Any]:
        """Every delivery kept and not handed out (to give back before closing)."""
        out = [m for msgs in self._stray.values() for _, m in msgs]
        self._stray.clear()
        return out

    async def _request(self, durable: str, n: int, wait: float) -> list[Any]:
        self._count += 1
        inbox = f"{self._prefix}.{self._count}"
        answers: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting[inbox] = self._reading[durable] = answers
        request: dict[str, Any] = {"batch": n}
        if wait > 0:
            request["expires"] = int(wait * 1e9)
        else:
            request["no_wait"] = True
        self._asked[durable] = time.monotonic()  # before the server can deliver anything
        try:
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{durable}",
                json.dumps(request).encode(),
                reply=inbox,
            )
            return await self._collect(answers, n, time.monotonic() + wait + ANSWER_GRACE)
        finally:
            del self._waiting[inbox], self._reading[durable]
            while not answers.empty():  # came after the end, or with it: keep them
                await self._route(answers.get_nowait())

    async def _collect(self, answers: asyncio.Queue[Any], n: int, until: float) -> list[Any]:
        got: list[Any] = []
        while len(got) < n:
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    msg = await answers.get()
            except TimeoutError:
                break
            status = _status(msg)
            if status is None:
                got.append(msg)
            elif status[0] in _ENDS:
                break
            elif status[0] == "503":
                raise ConsumerMissing(f"no consumer answers on stream {self._stream!r}")
            elif status[0] != _HEARTBEAT:
                raise PigeonError(f"JetStream refused a pull: {status[0]} {status[1]}".strip())
        return got
