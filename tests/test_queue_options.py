"""One options type and every default defined once (``pigeon.options``)."""

from __future__ import annotations

import pickle

import pigeon
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


def test_the_defaults_are_the_same_everywhere() -> None:
    cfg = ServerConfig()
    q = QueueState("q")
    assert cfg.port == DEFAULT_PORT
    assert cfg.default_lease == q.lease == DEFAULT_LEASE
    assert cfg.max_deliveries == q.max_deliveries == DEFAULT_MAX_DELIVERIES
    assert q.dedup_window == DEFAULT_DEDUP_WINDOW
    assert pigeon.Queue("pigeon://127.0.0.1/q")._spec.ep.port == DEFAULT_PORT  # type: ignore[attr-defined]


def test_every_backend_keeps_its_options_as_one_queue_options() -> None:
    with pigeon.Queue(maxsize=3, dedup_window=60) as local:
        assert local.options == QueueOptions(3, "pickle", dedup_window=60.0)  # type: ignore[attr-defined]
    with BrokerThread() as b:
        q = pigeon.Queue(b.url("opts") + "?lease=5", maxsize=2, max_deliveries=3, dedup_window=9)
        opts = q.options  # type: ignore[attr-defined]
        assert isinstance(opts, QueueOptions)
        assert (opts.maxsize, opts.lease, opts.max_deliveries, opts.dedup_window) == (2, 5, 3, 9)
        again = pickle.loads(pickle.dumps(q))
        assert again.options == opts
        q.close()
        again.close()
    r = pigeon.Queue("redis://127.0.0.1:6379/opts", maxsize=4, lease=7)
    assert r.options == QueueOptions(4, None, 7.0)  # type: ignore[attr-defined]
    r.close()
