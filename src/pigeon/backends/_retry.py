"""When to try again after a lost connection: one policy for every network client."""

from __future__ import annotations

import time


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
