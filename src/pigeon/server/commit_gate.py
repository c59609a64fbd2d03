"""Replies that wait for the store: a confirmed put is a stored put.

# Strategy:
# The broker's rules change the store and answer at once; a durable store writes those
# changes in batches and says when a batch has committed (written, and fsynced as the
# ``--fsync`` policy promises). A reply that reports a change - any reply to a request
# that changed the store - waits behind the latest batch; so does a put confirmation
# that changed nothing (a repeat of a remembered dedup id: what it repeats may not be
# committed yet, and "stored" must not go out before it is), and so does a JOIN's
# answer (the TASK_DONE that emptied the count may not be committed yet). Replies leave in the order
# they were made, once their batch commits, or - past ``store_timeout`` - as
# ``unavailable`` for the confirmations (stored or not, nobody can say) and as they are
# for the rest (they lose nothing if the store never keeps them). Sans-IO: the clock
# and the sending are the caller's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

from pigeon.protocol import Error
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import Confirmed, Joined
from pigeon.server.core import Store

__all__ = ["CommitGate", "put_confirmations"]

Out = tuple[int, Any]


@dataclass(slots=True)
class _Held:
    tag: int  # the store batch that must commit first
    outs: list[Out]
    since: float


@final  # compiled (pigeon/_compiled.py): Python code cannot subclass it
class CommitGate:
    """Holds replies until the store has committed what they report."""

    __slots__ = ("_clock", "_held", "store")

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self._clock = clock
        self._held: deque[_Held] = deque()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, changes_before: int, outs: list[Out]) -> bool:
        """Hold ``outs`` if they must wait for the store (True), given the store's change
        count before the request that made them; False: send them now."""
        store = self.store
        if not store.holds_replies or store.committed >= store.last_tag:
            return False  # nothing is waiting to be committed
        # Compare change counts, not batch tags: changes that join a batch already
        # pending leave the tag as it was, and their replies must wait all the same.
        if store.changes == changes_before and not any(
            type(m) is Confirmed or type(m) is Joined for _, m in outs
        ):
            return False
        self._held.append(_Held(store.last_tag, outs, self._clock()))
        return True

    def committed(self, batch: int) -> list[Out]:
        """The replies that were waiting for batches up to ``batch``, in order."""
        held = self._held
        out: list[Out] = []
        while held and held[0].tag <= batch:
            out += held.popleft().outs
        return out

    def overdue(self, limit: float) -> list[Out]:
        """Replies held longer than ``limit`` seconds, with each put confirmation and
        JOIN answer among them turned into ``unavailable``."""
        held, now = self._held, self._clock()
        out: list[Out] = []
        while held and now - held[0].since > limit:
            outs = held.popleft().outs
            puts = put_confirmations(outs)
            late = f"the broker's store did not commit within {limit:.0f} s"
            why = f"{late}; this put may or may not be stored"
            joined = f"{late}; the tasks done may not be recorded: join again"
            out += [
                (c, Error(m.req, Code.UNAVAILABLE, why)) if (c, getattr(m, "req", -1)) in puts
                else (c, Error(m.req, Code.UNAVAILABLE, joined)) if type(m) is Joined
                else (c, m)
                for c, m in outs
            ]  # fmt: skip
        return out

    def owes(self, conn: int) -> bool:
        """Does ``conn`` have a reply waiting here?"""
        return any(c == conn for h in self._held for c, _ in h.outs)


def put_confirmations(outs: list[Out]) -> frozenset[tuple[int, int]]:
    """(conn, req) of the put confirmations among ``outs`` (the broker marks them)."""
    return frozenset((c, m.req) for c, m in outs if isinstance(m, Confirmed))
