"""A message's headers as NATS carries them, exactly (sans-IO).

# Strategy:
# NATS headers are HTTP-flavoured: a name is a token (RFC 7230: no space, colon or
# non-ASCII letter), a value one line that nats-py trims and whose CR/LF it turns into
# spaces; names starting with ``Nats-`` are JetStream's, ``Status``/``Description`` mean a
# control message to nats-py. pigeon's headers are any str -> str (``options.
# check_headers``). A header that NATS carries unchanged goes as it is (readable by any
# NATS tool); any other goes escaped: the name ``Pigeon-Esc-`` + the name percent-encoded,
# the value percent-encoded (UTF-8, lone surrogates too), and is decoded on the way out.
# Names starting with ``Pigeon-`` are pigeon's: a caller's own such name is escaped, and
# pigeon's metadata (a dead letter's origin and reason) is not a header of the message.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

__all__ = ["ESCAPED", "OWN", "block_size", "from_nats", "to_nats"]

ESCAPED = "Pigeon-Esc-"  # an escaped header's name starts so
OWN = "Pigeon-"  # names pigeon keeps for itself (never a caller's header as is)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py's check on a name
_RESERVED = ("nats-", "pigeon-")
_CONTROL = ("status", "description")
_LINE = len(b"NATS/1.0\r\n")


def _as_is(name: str, value: str) -> bool:
    """Does NATS carry this header unchanged, and mean nothing else by it?"""
    low = name.lower()
    return (
        _TOKEN.fullmatch(name) is not None
        and not low.startswith(_RESERVED)
        and low not in _CONTROL
        and value == value.strip()
        and value.isprintable()  # no CR, LF or other control; no lone surrogate
    )


def to_nats(headers: dict[str, str]) -> dict[str, str]:
    """The caller's headers as NATS headers: as they are where that is exact, else escaped."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if _as_is(name, value):
            out[name] = value
        else:
            out[ESCAPED + _quote(name)] = _quote(value)
    return out


def from_nats(headers: dict[str, str] | None) -> dict[str, str]:
    """The caller's headers back from a NATS message's (JetStream's and pigeon's own left
    out, escaped ones decoded)."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if name.startswith(ESCAPED):
            out[_unquote(name[len(ESCAPED) :])] = _unquote(value)
        elif not name.startswith(("Nats-", OWN)):
            out[name] = value
    return out


def block_size(headers: dict[str, str]) -> int:
    """Bytes of the header block nats-py sends for ``headers`` (NATS headers, as made by
    ``to_nats``): the server counts them with the payload against ``max_payload``."""
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return _LINE + lines + 2


def _quote(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass")


def _unquote(text: str) -> str:
    return unquote(text, errors="surrogatepass")
