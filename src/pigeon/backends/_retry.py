"""How long a networked call may take: one policy for every network client.

# Strategy:
# A call's ``timeout`` becomes one monotonic deadline when the call starts
# (``deadline_from``). Everything the call does is measured against it: the wait the
# server is asked for, every reconnect attempt and the backoff between them, a new
# connection's handshake, and the wait for the reply. The reply may arrive a little after
# the deadline - the server answers "nothing came" *at* the deadline, and that answer
# still has to travel - so a client stops waiting for any answer at
# ``reply_deadline(deadline)``, the deadline plus ``REPLY_GRACE``: the stdlib's "blocks
# at most timeout seconds", plus a small constant. A call without a timeout waits as long
# as the connection lives (the silence limit, or the engine's own).
"""

from __future__ import annotations

import time

REPLY_GRACE = 1.0  # seconds past a call's deadline its last reply may still be on the way


def reply_deadline(deadline: float | None) -> float | None:
    """When a call with ``deadline`` stops waiting for any answer (None: no bound)."""
    return None if deadline is None else deadline + REPLY_GRACE


class Backoff:
    """Delays of 50 ms doubling to 1 s, until the caller's deadline; when the caller gave
    none, until ``reconnect_timeout`` after the connection *failed* (not after the call
    began: a consumer blocked for an hour still gets its whole budget when the broker
    restarts). ``restart()`` after a connection was re-established and failed again."""

    def __init__(self, deadline: float | None, reconnect_timeout: float) -> None:
        self.deadline = deadline
        self.reconnect_timeout = reconnect_timeout
        self.until = deadline
        self.delay = 0.05

    def restart(self) -> None:
        """A connection worked again since the last failure: a fresh budget."""
        self.delay = 0.05
        self.until = self.deadline

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None: give up now."""
        now = time.monotonic()
        if self.until is None:
            self.until = now + self.reconnect_timeout
        delay = self.delay
        if now + delay > self.until:
            return None
        self.delay = min(delay * 2, 1.0)
        return delay
