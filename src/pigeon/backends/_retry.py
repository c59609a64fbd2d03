"""When to try again after a lost connection: one policy for every network client."""

from __future__ import annotations

import time


class Backoff:
    """Delays of 50 ms doubling to 1 s, until the caller's deadline, or until
    ``reconnect_timeout`` from now when the caller gave none."""

    def __init__(self, deadline: float | None, reconnect_timeout: float) -> None:
        self.until = deadline if deadline is not None else time.monotonic() + reconnect_timeout
        self.delay = 0.05

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None: give up now."""
        delay = self.delay
        if time.monotonic() + delay > self.until:
            return None
        self.delay = min(delay * 2, 1.0)
        return delay
