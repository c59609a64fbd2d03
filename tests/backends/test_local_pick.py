"""What a take picks from the ring (backends/local/pick.py), sans-IO: any ring of plain
records, records with options and tombstones, wrapped or not, against a plain reference."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.backends.local import ring
from pigeon.backends.local.layout import K_BYTES, K_OPTIONS, K_TAKEN, KIND_AT, OPTS
from pigeon.backends.local.pick import pick, read

NOW = 100.0
CAPACITY = 4096

# (kind, priority, due, expires): a plain record, one with options, or a tombstone
records = st.lists(
    st.one_of(
        st.just((K_BYTES, 0, 0.0, 0.0)),
        st.tuples(
            st.just(K_OPTIONS),
            st.integers(0, 9),
            st.sampled_from([0.0, NOW - 1, NOW, NOW + 1]),
            st.sampled_from([0.0, NOW - 1, NOW, NOW + 5]),
        ),
        st.just((K_TAKEN, 0, 0.0, 0.0)),
    ),
    max_size=25,
)


def _ring(recs: list[tuple[int, int, float, float]], skip: int) -> tuple[bytearray, ring.RingState]:
    """A ring holding ``recs`` (bodies b"0", b"1", ...) after ``skip`` records of 100 bytes
    that were put and taken first, so that it wraps."""
    buf = bytearray(CAPACITY)
    st = ring.RingState(0, 0, 0, CAPACITY)

    def put(kind: int, payload: bytes) -> None:
        pos = ring.reserve(buf, st, len(payload))
        assert pos is not None
        ring.write(buf, pos, kind, 1, [payload])

    for _ in range(skip):
        put(K_BYTES, b"-" * 100)
    for i, (kind, priority, due, expires) in enumerate(recs):
        body = b"%d" % i
        opts = OPTS.pack(0, K_BYTES, priority, due, expires) if kind == K_OPTIONS else b""
        put(kind, opts + body)
        st.special += kind == K_OPTIONS
        st.tombs += kind == K_TAKEN
        if i == 0:  # the fillers go: the head moves on, and what follows wraps
            for _ in range(skip):
                ring.next_record(buf, st)
    if not recs:
        st.head = st.tail = st.count = 0
    st.unfinished = 1000
    return buf, st


def _walk(buf: Any, st: ring.RingState) -> list[bytes]:
    walk = ring.RingState(st.head, st.tail, st.count, st.capacity)
    out = []
    while walk.count:
        kind, _, at, length = ring.next_record(buf, walk)
        if kind != K_TAKEN:
            body = bytes(buf[at : at + length])
            out.append(body[OPTS.size :] if kind == K_OPTIONS else body)
    return out


@settings(max_examples=300)
@given(recs=records, skip=st.integers(0, 30), n=st.integers(1, 6))
def test_a_take_picks_by_priority_skips_what_is_not_due_and_drops_what_expired(
    recs: list[tuple[int, int, float, float]], skip: int, n: int
) -> None:
    buf, st = _ring(recs, skip)
    before = bytes(buf)
    expired = {i for i, r in enumerate(recs) if r[0] == K_OPTIONS and 0 < r[3] <= NOW}
    ready = [
        (-r[1], i)
        for i, r in enumerate(recs)
        if r[0] != K_TAKEN and i not in expired and not r[2] > NOW
    ]
    chosen = [i for _, i in sorted(ready)[:n]]

    got = pick(buf, st, n, NOW)

    assert bytes(buf) == before, "a pick writes nothing: the commit does"
    bodies = [bytes(p[OPTS.size :]) if k == K_OPTIONS else bytes(p) for k, _, p in got.records]
    assert bodies == [b"%d" % i for i in chosen]
    assert got.expired == len(expired) and not got.more
    due_later = [r[2] for r in recs if r[0] == K_OPTIONS and r[2] > NOW and not 0 < r[3] <= NOW]
    assert got.next_due == (min(due_later) if due_later else None)
    for pos in got.marks:  # what the commit writes
        buf[pos + KIND_AT : pos + KIND_AT + 2] = K_TAKEN.to_bytes(2, "little")
    left = [
        i for i, r in enumerate(recs) if r[0] != K_TAKEN and i not in expired and i not in chosen
    ]
    assert _walk(buf, st) == [b"%d" % i for i in left]
    assert st.count - st.tombs == len(left)
    assert st.special == sum(recs[i][0] == K_OPTIONS for i in left)
    assert st.unfinished == 1000 - len(expired)
    if st.count:  # the head rests on a live record: it passed every dead one before it
        assert _walk(buf, ring.RingState(st.head, st.tail, 1, st.capacity))[:1] == [b"%d" % left[0]]


@given(n=st.integers(0, 12), m=st.integers(1, 20), skip=st.integers(0, 30))
def test_a_plain_take_reads_from_the_head_in_order(n: int, m: int, skip: int) -> None:
    buf, st = _ring([(K_BYTES, 0, 0.0, 0.0)] * n, skip)
    got = read(buf, st, m)
    assert [bytes(p) for _, _, p in got] == [b"%d" % i for i in range(min(n, m))]
    assert st.count == max(0, n - m)
