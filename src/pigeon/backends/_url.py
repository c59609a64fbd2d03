"""Queue URLs: ``SCHEME://[USER[:PASSWORD]@]HOST[:PORT]/QUEUE[?OPTION=VALUE&...]``.

One parser for every networked backend, so each says what is wrong the same way.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from pigeon.errors import InvalidURL
from pigeon.protocol.rules import MAX_COUNT, int_problem, seconds_problem

__all__ = ["QueueURL", "check_maxsize"]


def check_maxsize(maxsize: object) -> int:
    """``maxsize`` as every backend takes it: an int >= 0 (0: unbounded)."""
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
        raise ValueError(f"maxsize must be an int >= 0 (0 for no limit), not {maxsize!r}")
    return maxsize


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
        self.queue = unquote(parts.path.lstrip("/"))
        if not self.queue or "/" in self.queue:
            raise InvalidURL(
                f"{url!r} names no queue: write {self.scheme}://{self.host}:{self.port}/QUEUE"
            )
        self.params = {k: v[-1] for k, v in parse_qs(parts.query).items()}

    @staticmethod
    def _host(text: str, default_port: int, url: str) -> tuple[str, int]:
        try:
            parts = urlsplit(f"//{text}")
            return parts.hostname or "127.0.0.1", parts.port or default_port
        except ValueError as exc:
            raise InvalidURL(f"bad host or port {text!r} in {url!r}: {exc}") from None

    def number(
        self, name: str, given: float | None = None, default: float | None = None
    ) -> float | None:
        """``given`` if set, else the URL's ``?name=`` as a number, else ``default``."""
        if given is not None:
            return given
        value = self.params.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise InvalidURL(f"{name}={value!r} in {self.url!r} is not a number") from None

    def seconds(
        self, name: str, given: float | None = None, default: float | None = None,
        *, positive: bool = True,
    ) -> float | None:  # fmt: skip
        """A duration option: ``given`` (checked: ValueError) or ``?name=`` (checked:
        InvalidURL), finite and in range, else ``default``."""
        if given is not None:
            if bad := seconds_problem(name, given, nil=False, positive=positive):
                raise ValueError(bad)
            return float(given)
        value = self.number(name)
        if value is None:
            return default
        if bad := seconds_problem(name, value, nil=False, positive=positive):
            raise InvalidURL(f"{bad} (in {self.url!r})")
        return value

    def count(self, name: str, given: int | None = None, default: int | None = None) -> int | None:
        """A count option (>= 1): ``given`` (ValueError) or ``?name=`` (InvalidURL)."""
        if given is not None:
            if bad := int_problem(name, given, 1, MAX_COUNT):
                raise ValueError(bad)
            return given
        raw = self.params.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or (bad := int_problem(name, value, 1, MAX_COUNT)):
            raise InvalidURL(
                f"{name} must be an integer from 1 to {MAX_COUNT}, not {raw!r} (in {self.url!r})"
            )
        return value

    def flag(self, name: str) -> bool:
        return self.params.get(name, "").lower() in ("1", "true", "yes")
