"""What the tests of the broker's rules share: three connections and readers of replies."""

from __future__ import annotations

from typing import Any

from pigeon.protocol import Deliver

A, B, C = 1, 2, 3


def replies(outs: list[tuple[int, Any]], conn: int) -> list[Any]:
    return [m for c, m in outs if c == conn]


def payloads(msg: Any) -> list[bytes]:
    assert isinstance(msg, Deliver), msg
    return [d.payload for d in msg.messages]


def ids(msg: Any) -> list[int]:
    return [d.id for d in msg.messages]
