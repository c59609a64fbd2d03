"""A byte stream cut into the chunks a socket might deliver, for the sans-IO codecs and
conversations fed with any chunking (Hypothesis draws the cuts)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable


def split(data: bytes, cuts: Iterable[int], *, keep_empty: bool = False) -> list[bytes]:
    """``data`` cut at the offsets ``cuts`` (each modulo ``len(data) + 1``, so any integers
    will do), the pieces in order. Empty pieces (a cut at either end) are dropped unless
    ``keep_empty``: to a conversation, ``b""`` is the end of the stream."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    return pieces if keep_empty else [p for p in pieces if p]
