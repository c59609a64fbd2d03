"""How nats:// lays a queue out in JetStream, sans-IO: subjects per priority, the delay
and ttl headers, and the manifest of an item stored in chunks."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.backends._natsmsg import (
    DUE,
    EXPIRES,
    LEVELS,
    Manifest,
    chunk_bounds,
    level_durable,
    level_of,
    level_subject,
    read_time,
    timing,
)
from pigeon.protocol.messages import PutOptions


def test_levels_are_asked_from_the_highest_down_and_zero_keeps_the_old_subject() -> None:
    assert list(LEVELS) == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert level_subject("jobs", 0) == "pigeon.jobs"  # as before priorities existed
    assert level_durable(0) == "pigeon"
    assert level_subject("jobs", 9) == "pigeon-p9.jobs"
    assert level_of("pigeon-p9.jobs", "jobs") == 9
    assert level_of("pigeon.jobs", "jobs") == 0
    assert level_of("pigeon-shutdown.jobs", "jobs") is None


@given(st.from_regex(r"[A-Za-z0-9_\-]{1,8}(\.[A-Za-z0-9_\-]{1,8}){0,2}", fullmatch=True))
@settings(max_examples=50)
def test_no_level_of_a_queue_is_a_subject_of_another_queue(name: str) -> None:
    """Queues ``Q`` and ``Q.x`` (a dead-letter queue, say) each have a stream, and two
    streams may not share a subject."""
    mine = {level_subject(name, level) for level in LEVELS}
    for other in (f"{name}.dead", f"{name}.9", f"p9.{name}", name.rpartition(".")[0]):
        if other and other != name:
            assert mine.isdisjoint(level_subject(other, level) for level in LEVELS)


def test_a_delay_and_a_ttl_are_wall_clock_times_and_the_ttl_counts_after_the_delay() -> None:
    assert timing(None, 100.0) == {}
    assert timing(PutOptions(), 100.0) == {}
    assert timing(PutOptions(delay=5), 100.0) == {DUE: "105.000000"}
    assert timing(PutOptions(ttl=2), 100.0) == {EXPIRES: "102.000000"}
    assert timing(PutOptions(delay=5, ttl=2), 100.0) == {DUE: "105.000000", EXPIRES: "107.000000"}


@pytest.mark.parametrize("text", [None, "", "soon", "nan", "inf", "-inf"])
def test_a_time_header_that_is_not_a_finite_number_is_ignored(text: str | None) -> None:
    headers = {} if text is None else {DUE: text}
    assert read_time(headers, DUE) is None


def test_a_manifest_round_trips() -> None:
    m = Manifest("PIGEON-CHUNKS_q", "pigeon-chunks.q.abc", 3_000_000, (4, 5, 6))
    assert Manifest.decode(m.encode()) == m


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_any_bytes_are_a_manifest_or_a_value_error(data: bytes) -> None:
    try:
        Manifest.decode(data)
    except ValueError:
        pass


@given(
    st.dictionaries(
        st.sampled_from(["v", "stream", "subject", "size", "seqs", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=5),
            st.lists(st.integers(), max_size=4),
        ),
    )
)
@settings(max_examples=200)
def test_any_json_object_is_a_manifest_or_a_value_error(raw: dict[str, object]) -> None:
    try:
        m = Manifest.decode(json.dumps(raw).encode())
    except ValueError:
        return
    assert m.stream and m.subject and m.size >= 0 and all(s > 0 for s in m.seqs)


def test_a_manifest_larger_than_any_pigeon_writes_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ValueError, match="larger than any pigeon writes"):
        Manifest.decode(b" " * (2 << 20))


@given(st.integers(0, 5000), st.integers(1, 700))
@settings(max_examples=100)
def test_chunks_cover_an_item_exactly_once_in_order(size: int, chunk: int) -> None:
    bounds = chunk_bounds(size, chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a < b <= a + chunk for a, b in bounds if size)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(bounds))
