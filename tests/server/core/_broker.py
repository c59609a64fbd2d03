"""What the tests of the broker's rules share: three connections, readers of replies, and a
store that notes what it is told."""

from __future__ import annotations

from typing import Any

from pigeon.protocol import Deliver
from pigeon.server.core import Store, Stored

A, B, C = 1, 2, 3


def replies(outs: list[tuple[int, Any]], conn: int) -> list[Any]:
    return [m for c, m in outs if c == conn]


def payloads(msg: Any) -> list[bytes]:
    assert isinstance(msg, Deliver), msg
    return [d.payload for d in msg.messages]


def ids(msg: Any) -> list[int]:
    return [d.id for d in msg.messages]


class Recorder(Store):
    """A store that keeps nothing but notes every change the broker tells it of, in order,
    and gives back at start what it was made with."""

    def __init__(
        self,
        messages: list[tuple[str, Stored]] | None = None,
        queues: dict[str, dict[str, Any]] | None = None,
        dedup: dict[str, dict[str, float]] | None = None,
        taken: dict[str, int] | None = None,
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._messages = messages or []
        self._queues = queues or {}
        self._dedup = dedup or {}
        self._taken = taken or {}

    def added(self, queue: str, msg: Stored) -> None:
        self.calls.append(("added", queue, msg.id))

    def added_plain(self, queue: str, msgs: list[Stored]) -> None:
        self.calls.append(("added_plain", queue, [m.id for m in msgs]))

    def removed(self, queue: str, msg_id: int) -> None:
        self.calls.append(("removed", queue, msg_id))

    def moved(self, msg: Stored, queue: str) -> None:
        self.calls.append(("moved", queue, msg.id, msg.reason))

    def deduped(self, queue: str, dedup_id: str, until: float) -> None:
        self.calls.append(("deduped", queue, dedup_id, until))

    def declared(self, queue: str, settings: dict[str, Any] | None) -> None:
        self.calls.append(("declared", queue, settings))

    def taken(self, queue: str, n: int) -> None:
        self.calls.append(("taken", queue, n))

    def recover(self) -> list[tuple[str, Stored]]:
        return self._messages

    def recover_queues(self) -> dict[str, dict[str, Any]]:
        return self._queues

    def recover_dedup(self) -> dict[str, dict[str, float]]:
        return self._dedup

    def recover_taken(self) -> dict[str, int]:
        return self._taken

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == kind]
