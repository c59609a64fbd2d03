"""pigeon.integrations.celery.mapping: what a kombu message asks of the broker (sans-IO)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tests.integrations._support import require

require("celery", "celery", "kombu")

from pigeon.integrations.celery.mapping import (  # noqa: E402
    MAX_SECONDS,
    check_lease,
    eta_delay,
    pigeon_priority,
    put_options,
    queue_name,
    queue_url,
)

NOW = 1_800_000_000.0


def iso(seconds_from_now: float, tz: timezone | None = UTC) -> str:
    when = datetime.fromtimestamp(NOW + seconds_from_now, tz=UTC)
    return when.astimezone(tz).isoformat() if tz else when.replace(tzinfo=None).isoformat()


def test_eta_with_an_offset_is_a_delay_from_now() -> None:
    assert eta_delay(iso(30), NOW) == pytest.approx(30)
    other_zone = timezone(timedelta(hours=-7))
    assert eta_delay(iso(30, other_zone), NOW) == pytest.approx(30)


def test_eta_already_due_or_missing_is_no_delay() -> None:
    assert eta_delay(iso(-5), NOW) is None
    assert eta_delay(iso(0), NOW) is None
    assert eta_delay(None, NOW) is None
    assert eta_delay("", NOW) is None
    assert eta_delay(12345, NOW) is None


def test_eta_that_does_not_parse_is_left_to_the_worker() -> None:
    assert eta_delay("tomorrow at noon", NOW) is None


def test_naive_eta_is_read_the_earlier_way_so_the_broker_never_holds_it_late() -> None:
    naive = datetime.fromtimestamp(NOW + 600, tz=UTC).replace(tzinfo=None).isoformat()
    as_utc = 600.0
    as_local = datetime.fromisoformat(naive).timestamp() - NOW
    assert eta_delay(naive, NOW) == pytest.approx(min(as_utc, as_local))


def test_eta_beyond_the_brokers_range_is_held_for_the_range() -> None:
    assert eta_delay(iso(MAX_SECONDS * 3), NOW) == MAX_SECONDS


@pytest.mark.parametrize("p", range(10))
def test_priorities_0_to_9_map_to_themselves(p: int) -> None:
    assert pigeon_priority(p, None) == (p or None)
    assert pigeon_priority(p, 9) == (p or None)


@pytest.mark.parametrize(
    ("p", "top", "expected"),
    [
        (0, 255, None),
        (25, 255, None),
        (26, 255, 1),
        (128, 255, 5),
        (230, 255, 8),
        (231, 255, 9),
        (255, 255, 9),
        (10, 10, 9),
        (1, 10, None),
        (2, 10, 1),
        (5, 10, 4),
    ],
)
def test_a_wider_scale_is_cut_in_ten_equal_bands(p: int, top: int, expected: int | None) -> None:
    assert pigeon_priority(p, top) == expected


def test_priorities_outside_the_scale_are_clamped() -> None:
    assert pigeon_priority(300, 255) == 9
    assert pigeon_priority(12, None) == 9
    assert pigeon_priority(-3, None) is None


@pytest.mark.parametrize("p", [None, True, "5", float("nan"), float("inf")])
def test_what_is_not_a_priority_is_none(p: object) -> None:
    assert pigeon_priority(p, None) is None


def test_put_options_read_eta_priority_and_dedup_id_from_the_envelope() -> None:
    message = {
        "headers": {"eta": iso(90), "tenant": "acme"},
        "properties": {"priority": 7, "dedup_id": "order-1", "delivery_tag": "x"},
    }
    opts = put_options(message, NOW, None)
    assert opts == {"delay": pytest.approx(90), "priority": 7, "dedup_id": "order-1"}


def test_put_options_of_a_plain_message_are_none() -> None:
    assert put_options({"headers": {}, "properties": {"priority": 0}}, time.time(), None) == {}


@pytest.mark.parametrize("dedup_id", ["", 5, ["a"]])
def test_a_dedup_id_that_is_not_a_non_empty_str_is_refused(dedup_id: object) -> None:
    with pytest.raises(TypeError, match="dedup_id must be a non-empty str"):
        put_options({"properties": {"dedup_id": dedup_id}}, NOW, None)


def test_a_virtual_host_prefixes_queue_names() -> None:
    assert queue_name("celery", "/") == "celery"
    assert queue_name("celery", None) == "celery"
    assert queue_name("celery", "") == "celery"
    assert queue_name("celery", "app1") == "app1:celery"
    assert queue_name("celery", "/app1/") == "app1:celery"


def test_queue_url_quotes_the_token_and_the_name() -> None:
    assert queue_url("127.0.0.1", 7878, "celery") == "pigeon://127.0.0.1:7878/celery"
    assert queue_url("h", 1, "a b/c", token="t@k:n") == "pigeon://:t%40k%3An@h:1/a%20b%2Fc"
    assert queue_url("::1", 7878, "q", tls=True, cafile="/ca.pem", insecure=True) == (
        "pigeon+tls://[::1]:7878/q?cafile=%2Fca.pem&insecure=1"
    )


@pytest.mark.parametrize("lease", [0, -1, float("nan"), MAX_SECONDS + 1, "60", True])
def test_a_lease_out_of_range_is_refused(lease: object) -> None:
    with pytest.raises(ValueError, match="the pigeon transport's lease must be"):
        check_lease(lease)
