"""Queue URLs: ``SCHEME://[USER[:PASSWORD]@]HOST[:PORT]/QUEUE[?OPTION=VALUE&...]``.

QUEUE is percent-decoded: a name with ``/`` (``reports/daily``) is written ``reports%2Fdaily``,
one with ``%`` ``%25``.

One parser for every networked backend, so each says what is wrong the same way.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from pigeon.errors import InvalidURL
from pigeon.options import count_option, number_option, seconds_option, url_query

__all__ = ["QueueURL"]


class QueueURL:
    """What a queue URL says: where, as whom, which queue, which options."""

    def __init__(
        self, url: str, schemes: tuple[str, ...], default_port: int, *, many: bool = False
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in schemes:
            raise InvalidURL(f"{url!r} is not a {' or '.join(s + '://' for s in schemes)} URL")
        self.url = url
        self.scheme = parts.scheme
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        # several seed hosts, for a cluster: HOST:PORT,HOST:PORT,...
        if "," in hostlist and not many:
            raise InvalidURL(f"{url!r} names several hosts; {self.scheme}:// takes one")
        self.hosts = [self._host(h, default_port, url) for h in hostlist.split(",")]
        self.host, self.port = self.hosts[0]
        user, sep, password = userinfo.partition(":")
        self.username = unquote(user) if user else None
        self.password = unquote(password) if sep and password else None
        path = parts.path.lstrip("/")
        if not path:
            raise InvalidURL(
                f"{url!r} names no queue: write {self.scheme}://{self.host}:{self.port}/QUEUE"
            )
        if "/" in path:
            raise InvalidURL(
                f"{url!r} has a '/' in its path: a queue name with '/' is written %2F "
                f"({self.scheme}://{self.host}:{self.port}/{path.replace('/', '%2F')})"
            )
        # percent-decoded once: %2F is a '/' in the name, %25 a '%'
        self.queue = unquote(path)
        self.params = url_query(url)  # all of them; the queue options are from_url's

    @staticmethod
    def _host(text: str, default_port: int, url: str) -> tuple[str, int]:
        try:
            parts = urlsplit(f"//{text}")
            return parts.hostname or "127.0.0.1", parts.port or default_port
        except ValueError as exc:
            raise InvalidURL(f"bad host or port {text!r} in {url!r}: {exc}") from None

    # The backend's own options (``?db=``, ``?wait_timeout=``, ``?replicas=``), read and
    # checked as the queue's are (``pigeon.options``).

    def number(self, name: str, default: float | None = None) -> float | None:
        return number_option(name, self.params, self.url, default)

    def seconds(
        self, name: str, default: float | None = None, *, positive: bool = True
    ) -> float | None:
        return seconds_option(name, None, self.params, self.url, default, positive=positive)

    def count(self, name: str, default: int | None = None) -> int | None:
        return count_option(name, None, self.params, self.url, default)

    def flag(self, name: str) -> bool:
        return self.params.get(name, "").lower() in ("1", "true", "yes")
