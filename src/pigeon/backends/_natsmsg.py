"""How a queue's messages are laid out in JetStream (sans-IO): subjects per priority,
the headers that carry a delay and a ttl, and the manifest of an item stored in chunks.

# Strategy:
# JetStream 2.9 has no per-message delay, no dead-lettering expiry and no priorities,
# so pigeon keeps each as data JetStream already carries, and the readers act on it:
# - priority: one subject per level in the queue's stream (``pigeon.Q`` is level 0, as
#   before priorities existed; ``pigeon-p9.Q`` ... ``pigeon-p1.Q``), one durable pull
#   consumer per level; a reader asks the levels from 9 down. A level is a subject of
#   its own root (not ``pigeon.Q.9``), so no level of ``Q`` is ever the subject of a
#   queue named ``Q.9``.
# - delay: ``Pigeon-Due`` (wall-clock seconds since the epoch, at the putting host); a
#   reader handed a message before that time gives it back with a NAK delayed until
#   then (JetStream honours a NAK's delay since 2.7), so no handler sees it early.
# - ttl: ``Pigeon-Expires`` (the same clock: put time + delay + ttl); a reader handed a
#   message past that time moves it to ``Q.dead`` (reason ``expired``) instead.
# - items over the server's max_payload: the payload in chunks in a stream of their own
#   (``pigeon-chunks.Q.ITEM``), then a manifest - the only message a reader consumes -
#   naming the chunks' sequence numbers; published only once every chunk is stored.
"""

from __future__ import annotations

import dataclasses
import json
import math

from pigeon.protocol.messages import PutOptions

__all__ = [
    "CHUNKED",
    "DUE",
    "EXPIRES",
    "LEVELS",
    "Manifest",
    "level_durable",
    "level_of",
    "level_subject",
    "read_time",
    "timing",
]

LEVELS = range(9, -1, -1)  # the order a reader asks them in: highest first
DUE = "Pigeon-Due"  # not to be delivered before this time (a put's delay)
EXPIRES = "Pigeon-Expires"  # to go to the dead letters if still waiting at this time
CHUNKED = "Pigeon-Chunked"  # the payload is a manifest: the item is stored in chunks
_MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is small (a sequence per chunk): refuse more


def level_subject(queue: str, level: int) -> str:
    """The subject of ``queue``'s messages of priority ``level``."""
    return f"pigeon.{queue}" if level == 0 else f"pigeon-p{level}.{queue}"


def level_durable(level: int) -> str:
    """The durable pull consumer that reads ``level``."""
    return "pigeon" if level == 0 else f"pigeon-p{level}"


def level_of(subject: str, queue: str) -> int | None:
    """The priority level of a subject of ``queue``'s stream, or None if it is none."""
    for level in LEVELS:
        if subject == level_subject(queue, level):
            return level
    return None


def timing(options: PutOptions | None, now: float) -> dict[str, str]:
    """The headers that carry a put's ``delay`` and ``ttl`` (``now``: wall-clock)."""
    if options is None:
        return {}
    out: dict[str, str] = {}
    start = now
    if options.delay and options.delay > 0:
        start = now + options.delay
        out[DUE] = _stamp(start)
    if options.ttl and options.ttl > 0:
        out[EXPIRES] = _stamp(start + options.ttl)
    return out


def read_time(headers: dict[str, str] | None, name: str) -> float | None:
    """A time header as written by ``timing``; None if absent or not a finite number (a
    header some other publisher wrote: ignored rather than trusted)."""
    text = (headers or {}).get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _stamp(t: float) -> str:
    return f"{t:.6f}"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Where the chunks of one item are: ``stream``, under ``subject``, at ``seqs``."""

    stream: str
    subject: str
    size: int
    seqs: tuple[int, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {"v": _MANIFEST_VERSION, "stream": self.stream, "subject": self.subject,
             "size": self.size, "seqs": list(self.seqs)},
            separators=(",", ":"),
        ).encode()  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Raises ValueError for anything that is not a manifest this version wrote."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"a manifest of {len(data)} bytes is larger than any pigeon writes")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a manifest: {exc}") from None
        if not isinstance(raw, dict) or raw.get("v") != _MANIFEST_VERSION:
            raise ValueError("not a manifest of version 1")
        stream, subject, size, seqs = (raw.get(k) for k in ("stream", "subject", "size", "seqs"))
        if not (isinstance(stream, str) and stream and isinstance(subject, str) and subject):
            raise ValueError("a manifest names no stream or subject")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"a manifest's size must be an int >= 0, not {size!r}")
        if not isinstance(seqs, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in seqs
        ):
            raise ValueError("a manifest's seqs must be a list of ints > 0")
        if len(seqs) > max(1, size):
            raise ValueError(f"a manifest of {len(seqs)} chunks for {size} bytes")
        return cls(stream, subject, size, tuple(seqs))


def chunk_bounds(size: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk of an item of ``size`` bytes (at least one)."""
    if chunk < 1:
        raise ValueError(f"chunk size must be >= 1, not {chunk}")
    return [(i, min(i + chunk, size)) for i in range(0, size, chunk)] or [(0, 0)]
