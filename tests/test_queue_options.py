"""One options type, built in one place (``QueueOptions.from_url``), and every default
defined once (``pigeon.options``)."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

import pigeon
from pigeon.errors import InvalidURL
from pigeon.options import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_LEASE,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_PORT,
    QueueOptions,
)
from pigeon.server.app import ServerConfig
from pigeon.server.core import QueueState
from pigeon.testing.broker import BrokerThread
from tests._services import queue_name, require_service

NETWORKED = ("pigeon", "redis", "nats")
SERVICES = {"redis": 6379, "nats": 4222}


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


def _url(backend: str, broker: BrokerThread, query: str = "") -> str:
    if backend == "pigeon":
        return broker.url(queue_name()) + query
    return f"{backend}://127.0.0.1:{SERVICES[backend]}/{queue_name()}{query}"


def _need(backend: str) -> None:
    if backend in SERVICES:
        require_service(backend, SERVICES[backend])


def test_the_defaults_are_the_same_everywhere() -> None:
    cfg = ServerConfig()
    q = QueueState("q")
    assert cfg.port == DEFAULT_PORT
    assert cfg.default_lease == q.lease == DEFAULT_LEASE
    assert cfg.max_deliveries == q.max_deliveries == DEFAULT_MAX_DELIVERIES
    assert q.dedup_window == DEFAULT_DEDUP_WINDOW
    assert pigeon.Queue("pigeon://127.0.0.1/q")._spec.ep.port == DEFAULT_PORT  # type: ignore[attr-defined]


def test_from_url_reads_the_url_and_a_keyword_given_wins() -> None:
    url = "redis://h/q?lease=5&max_deliveries=3&dedup_window=0&db=2"
    assert QueueOptions.from_url(url, 2, max_deliveries=4) == QueueOptions(
        2, "msgpack", 5.0, 4, 0.0, 30.0, 10.0
    )
    assert QueueOptions.from_url(None) == QueueOptions(serializer="pickle")
    assert QueueOptions.from_url("nats://h/q") == QueueOptions(serializer="msgpack")


@pytest.mark.parametrize(
    ("query", "keywords", "error", "match"),
    [
        ("", {"maxsize": -1}, ValueError, "maxsize must be an int >= 0"),
        ("", {"maxsize": "3"}, ValueError, "maxsize"),
        ("", {"serializer": "yaml"}, ValueError, "unknown serializer 'yaml'"),
        ("", {"serializer": 3}, TypeError, "serializer must be a name"),
        ("", {"lease": 0}, ValueError, "lease must be a finite number of seconds more than 0"),
        ("", {"lease": math.inf}, ValueError, "lease"),
        ("", {"lease": "5"}, ValueError, "lease must be a number of seconds"),
        ("", {"max_deliveries": 0}, ValueError, "max_deliveries must be an integer from 1"),
        ("", {"max_deliveries": 2.5}, ValueError, "max_deliveries"),
        ("", {"dedup_window": -1}, ValueError, "dedup_window must be a finite number"),
        ("", {"reconnect_timeout": -1}, ValueError, "reconnect_timeout"),
        ("", {"connect_timeout": 0}, ValueError, "connect_timeout"),
        ("?lease=soon", {}, InvalidURL, "lease='soon' in .* is not a number"),
        ("?lease=-1", {}, InvalidURL, r"lease must be .* \(in "),
        ("?max_deliveries=0", {}, InvalidURL, "max_deliveries must be an integer"),
        ("?dedup_window=-5", {}, InvalidURL, "dedup_window must be"),
    ],
)
@pytest.mark.parametrize("backend", NETWORKED)
def test_every_networked_backend_refuses_the_same_bad_values_the_same_way(
    backend: str,
    broker: BrokerThread,
    query: str,
    keywords: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    url = _url(backend, broker, query)
    with pytest.raises(error, match=match):
        QueueOptions.from_url(url, **keywords)
    with pytest.raises(error, match=match):
        pigeon.Queue(url, **keywords)
    with pytest.raises(error, match=match):
        pigeon.AsyncQueue(url, **keywords)


@pytest.mark.parametrize(
    ("keywords", "error"),
    [
        ({"maxsize": -1}, ValueError),
        ({"serializer": "yaml"}, ValueError),
        ({"serializer": 3}, TypeError),
        ({"dedup_window": -1}, ValueError),
        ({"dedup_window": "60"}, ValueError),
    ],
)
def test_a_local_queue_refuses_them_as_the_networked_ones_do(
    keywords: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        QueueOptions.from_url("pigeon://h/q", **keywords)
    with pytest.raises(error):
        pigeon.Queue(**keywords)


@pytest.mark.parametrize("backend", NETWORKED)
def test_every_backend_builds_the_same_options_from_the_same_url_and_keywords(
    backend: str, broker: BrokerThread
) -> None:
    _need(backend)
    keywords: dict[str, Any] = {
        "maxsize": 5, "max_deliveries": 4, "reconnect_timeout": 7, "connect_timeout": 3,
    }  # fmt: skip
    url = _url(backend, broker, "?lease=6&max_deliveries=3")
    expected = QueueOptions(5, "msgpack", 6.0, 4, None, 7.0, 3.0)
    assert QueueOptions.from_url(url, **keywords) == expected
    with pigeon.Queue(url, **keywords) as q:
        assert q.options == expected  # type: ignore[attr-defined]
        again = pickle.loads(pickle.dumps(q))
        assert again.options == expected
        again.close()


@pytest.mark.parametrize("backend", NETWORKED)
def test_every_backend_takes_dedup_window_from_the_url_or_the_keyword(
    backend: str, broker: BrokerThread
) -> None:
    _need(backend)
    for query, keywords in (("?dedup_window=9", {}), ("?dedup_window=1", {"dedup_window": 9})):
        url = _url(backend, broker, query)
        with pigeon.Queue(url, **keywords) as q:
            assert q.options.dedup_window == 9.0  # type: ignore[attr-defined]


def test_a_local_queue_keeps_its_options_as_one_queue_options() -> None:
    with pigeon.Queue(maxsize=3, dedup_window=60) as local:
        assert local.options == QueueOptions(3, "pickle", dedup_window=60.0)  # type: ignore[attr-defined]
    with pigeon.Queue(dedup_window=None) as local:  # None: the default, as on every backend
        assert local.options.dedup_window == DEFAULT_DEDUP_WINDOW  # type: ignore[attr-defined]
