"""Who may talk to the broker: the shared token, and what a wrong one costs.

# Strategy:
# The token is compared in constant time. A wrong token is answered only after a delay
# (``failure_delay``, 1 s) and the connection is then closed, so guessing is slow; and an
# address may hold at most ``max_unauthenticated`` connections that have not logged in
# yet, so it cannot guess in parallel either. There is deliberately no lockout: a
# lockout lets anyone who can reach the port (or, for 127.0.0.1, any local process) lock
# out the clients that do hold the token. The right token is always accepted at once.
# Only a wrong token counts as a failure; a human typing HELP before AUTH is told to log
# in, not punished.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter

log = logging.getLogger("pigeon.server")

__all__ = ["Authenticator"]


class Authenticator:
    """Checks tokens and keeps the counts that ``pigeon stats`` shows."""

    def __init__(
        self, token: str | None, failure_delay: float = 1.0, max_unauthenticated: int = 64
    ) -> None:
        self.token = token
        self.failure_delay = failure_delay
        self.max_unauthenticated = max_unauthenticated
        self.failures = 0
        self._pending: Counter[str] = Counter()  # host -> connections not yet logged in

    @property
    def required(self) -> bool:
        return bool(self.token)

    def check(self, token: str | None, peer: str) -> bool:
        """True if ``token`` is the broker's (always true when it has none)."""
        expected = self.token
        if not expected:
            return True
        ok = token is not None and hmac.compare_digest(token.encode(), expected.encode())
        if not ok:
            self.failures += 1
            log.warning("wrong token from %s (%d failures so far)", peer, self.failures)
        return ok

    def admit(self, host: str) -> bool:
        """A new connection from ``host`` that must log in: False if that host already
        has ``max_unauthenticated`` of them."""
        if not self.token:
            return True
        if self._pending[host] >= self.max_unauthenticated:
            return False
        self._pending[host] += 1
        return True

    def settled(self, host: str) -> None:
        """A connection admitted by ``admit`` logged in or closed."""
        if not self.token:
            return
        self._pending[host] -= 1
        if self._pending[host] <= 0:
            del self._pending[host]
