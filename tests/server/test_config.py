"""The broker's settings and what follows from them."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

import pigeon
from pigeon.server.app import BrokerServer
from pigeon.server.config import ServerConfig
from pigeon.server.core import Broker
from pigeon.server.limits import Limits
from pigeon.testing.broker import BrokerThread


def test_max_reply_bytes_is_sane_for_small_frames() -> None:
    # It was min(max_frame_size, max_pending_output) - 64 KiB, at least 1: with a frame
    # size of 1024 no message of 2 bytes could be delivered.
    assert ServerConfig(max_frame_size=1024).max_reply_bytes == 1024
    assert ServerConfig().max_reply_bytes == 16 * 2**20
    small_output = ServerConfig(max_pending_output=100_000)
    assert small_output.max_reply_bytes == 50_000  # half of it stays free for the rest
    assert ServerConfig(max_pending_output=0).max_reply_bytes == 16 * 2**20


def test_every_limit_of_the_server_config_reaches_the_broker() -> None:
    # The limits are defined once (Limits, which ServerConfig extends) and the broker
    # reads them from the config it was given, not from a copy of each as a keyword.
    changed = {
        f.name: f.default * 2 + 1
        for f in dataclasses.fields(Limits)
        if isinstance(f.default, int | float)
    }
    assert len(changed) == len(dataclasses.fields(Limits))  # every one is a number

    async def main() -> Broker:
        return BrokerServer(ServerConfig(**changed)).broker  # never started

    broker = asyncio.run(main())
    assert {name: getattr(broker.limits, name) for name in changed} == changed
    assert broker._queue("q").lease == changed["default_lease"]
    assert broker._queue("q").max_deliveries == changed["max_deliveries"]


def test_a_bare_broker_has_the_limits_a_server_has_by_default() -> None:
    server_defaults = ServerConfig()
    assert Broker().limits == Limits()
    for f in dataclasses.fields(Limits):
        assert getattr(server_defaults, f.name) == getattr(Limits(), f.name), f.name


def test_numbers_given_from_python_are_made_the_type_the_broker_reads() -> None:
    # review round 8 (compiled) #7: BrokerThread(max_pending_output=64e6) served on the
    # source and closed every connection once compiled (compiled code refuses a float
    # where it reads an int)
    config = ServerConfig(max_pending_output=64e6, max_queues=1e4, heartbeat=5, port=0.0)
    assert type(config.max_pending_output) is int and config.max_pending_output == 64_000_000
    assert type(config.max_queues) is int and type(config.port) is int
    assert type(config.heartbeat) is float
    with pytest.raises(ValueError, match="max_queues must be a whole number"):
        ServerConfig(max_queues=1.5)
    with pytest.raises(TypeError, match="max_deliveries must be a number"):
        ServerConfig(max_deliveries="5")  # type: ignore[arg-type]


def test_a_broker_configured_with_float_counts_serves() -> None:
    with BrokerThread(max_pending_output=64e6, max_unacked_bytes=64e6, max_deliveries=20.0) as b:
        q = pigeon.Queue(b.url("floats"), serializer="raw")
        q.put(b"x")
        assert q.get(timeout=5) == b"x"
        q.close()
