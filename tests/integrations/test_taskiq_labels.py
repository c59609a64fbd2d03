"""pigeon.integrations.taskiq.labels: what a taskiq message's labels ask of the broker
(sans-IO; no taskiq needed)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.integrations.taskiq.labels import LabelNames, Placement, placement
from pigeon.options import put_options


def test_no_labels_is_a_plain_put_with_the_task_in_its_headers() -> None:
    assert placement("abc", "app:add", {}) == Placement(
        headers={"task_id": "abc", "task_name": "app:add"}
    )


def test_labels_as_taskiq_sends_them_stringified() -> None:
    # taskiq.labels.prepare_label turns every label into a str before kick()
    p = placement("id", "t", {"delay": "2.5", "priority": "7", "queue_name": "mail"})
    assert (p.delay, p.priority, p.queue) == (2.5, 7, "mail")


def test_labels_as_a_custom_formatter_may_leave_them() -> None:
    p = placement("id", "t", {"delay": 3, "priority": 4.0})
    assert (p.delay, p.priority) == (3.0, 4)


def test_zero_delay_is_no_delay() -> None:
    assert placement("id", "t", {"delay": "0"}).delay is None


def test_label_names_can_be_changed() -> None:
    names = LabelNames(delay="x_delay", priority="rank", dedup_id="unique", queue="route")
    p = placement("id", "t", {"x_delay": "1", "delay": "99", "rank": "2", "unique": "u",
                              "route": "q2"}, names)  # fmt: skip
    assert (p.delay, p.priority, p.dedup_id, p.queue) == (1.0, 2, "u", "q2")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"priority": "10"}, r"label 'priority' must be an integer from 0 to 9 .*not '10'"),
        ({"priority": "-1"}, r"label 'priority' must be an integer from 0 to 9"),
        ({"priority": "2.5"}, r"label 'priority' must be an integer from 0 to 9"),
        ({"priority": "high"}, r"label 'priority' must be an integer from 0 to 9"),
        ({"priority": True}, r"label 'priority' must be an integer"),
        ({"delay": "soon"}, r"label 'delay' must be a number of seconds from 0 to 31622400"),
        ({"delay": "0:00:05"}, r"label 'delay' must be a number of seconds"),  # str(timedelta)
        ({"delay": "-1"}, r"label 'delay' must be a number of seconds"),
        ({"delay": "nan"}, r"label 'delay' must be a number of seconds"),
        ({"delay": "1e9"}, r"label 'delay' must be a number of seconds"),
        ({"dedup_id": "x" * 300}, r"label 'dedup_id' makes a dedup id of 300 bytes"),
    ],
)
def test_a_label_the_broker_cannot_honour_is_refused_naming_it(
    labels: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        placement("id", "t", labels)


def test_a_retry_keeps_the_dedup_id_but_is_a_new_put() -> None:
    first = placement("id", "t", {"dedup_id": "order-42"}).dedup_id
    retry1 = placement("id", "t", {"dedup_id": "order-42", "_retries": "1"}).dedup_id
    retry2 = placement("id", "t", {"dedup_id": "order-42", "_retries": "2"}).dedup_id
    requeued = placement("id", "t", {"dedup_id": "order-42", "X-Taskiq-requeue": "1"}).dedup_id
    assert first == "order-42"
    assert len({first, retry1, retry2, requeued}) == 4
    # the same attempt sent twice (a worker that died after sending its retry) is a repeat
    assert retry1 == placement("id", "t", {"_retries": "1", "dedup_id": "order-42"}).dedup_id


def test_labels_are_mirrored_in_the_headers_when_they_fit() -> None:
    p = placement("id", "t", {"tenant": "acme", "task_id": "spoof"})
    assert p.headers == {"tenant": "acme", "task_id": "id", "task_name": "t"}


def test_labels_too_large_for_headers_leave_only_the_task_in_them() -> None:
    many = {f"l{i}": "v" for i in range(80)}
    big = {"blob": "x" * 20_000}
    for labels in (many, big):
        assert placement("id", "t", labels).headers == {"task_id": "id", "task_name": "t"}


label_values = st.one_of(
    st.text(max_size=40),
    st.integers(-20, 20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-20, 20),
    st.floats(),
    st.booleans(),
    st.none(),
)
label_names = st.one_of(
    st.sampled_from(["delay", "priority", "dedup_id", "queue_name", "_retries", "task_id"]),
    st.text(max_size=300),
)


@settings(max_examples=300)
@given(st.dictionaries(label_names, label_values, max_size=70))
def test_any_labels_give_a_put_pigeon_accepts_or_a_value_error(labels: dict[str, Any]) -> None:
    try:
        p = placement("0123abcd", "app:task", labels)
    except ValueError:
        return
    # whatever placement returns, pigeon's own checks of a put accept
    put_options(p.delay, None, p.dedup_id, p.priority, p.headers)
    assert p.headers["task_id"] == "0123abcd" and p.headers["task_name"] == "app:task"
