"""docs/protocol.md held to a real broker, the way a client in another language meets it.

Everything here is built by hand from the spec - ``struct`` for the length header,
MessagePack (msgspec) for values - never with pigeon's protocol classes, so a change of
the broker that the spec does not follow (or the reverse) fails here. The example
session of section 8 is read from the page itself and replayed byte for byte; then one
exchange per request kind, with the replies the tables promise.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.server.store.log import LogStore
from pigeon.testing.broker import BrokerThread

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

HELLO, WELCOME, PUT, PUT_BATCH, GET, CANCEL = 0x01, 0x02, 0x10, 0x11, 0x20, 0x21
ACK, NACK, EXTEND, DECLARE, INFO, TASK_DONE, JOIN = 0x30, 0x31, 0x32, 0x40, 0x41, 0x42, 0x43
SHUTDOWN, PURGE, DELETE, PEEK, MOVE, STATS = 0x44, 0x45, 0x46, 0x47, 0x48, 0x50
PING, PONG, GOODBYE = 0x60, 0x61, 0x70
OK, DELIVER, ERROR, QUEUE_SHUTDOWN = 0x80, 0x81, 0x8F, 0x90

QUEUE_INFO_KEYS = {
    "name", "depth", "in_flight", "maxsize", "unfinished", "shutdown", "consumers_waiting",
    "lease", "max_deliveries", "delayed", "dedup_window", "put_total", "delivered_total",
    "acked_total", "redelivered_total", "dead_total",
}  # fmt: skip
PEEK_KEYS = {"id", "delivery_count", "payload", "age", "origin", "reason", "priority", "headers"}


def frame(*fields: Any) -> bytes:
    body = msgspec.msgpack.encode(list(fields))
    return struct.pack(">I", len(body)) + body


class Wire:
    """A connection to the broker that knows nothing but the spec."""

    def __init__(self, port: int, *, hello: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.welcome: list[Any] = []
        if hello:
            self.send(HELLO, "PGN", 1, "spec-test", None)
            self.welcome = self.recv()

    def send(self, *fields: Any) -> None:
        self.sock.sendall(frame(*fields))

    def frame(self, timeout: float = 10.0) -> bytes | None:
        """The next whole frame (its header too), or None at the end of the stream."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                assert not self.buf, f"the stream ended mid-frame: {self.buf.hex(' ')}"
                return None
            self.buf += data
        n = 4 + struct.unpack(">I", self.buf[:4])[0]
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, timeout: float = 10.0) -> Any:
        """The next message the broker sends (not a PING: those are answered)."""
        while True:
            data = self.frame(timeout)
            assert data is not None, "the broker closed the connection"
            msg = msgspec.msgpack.decode(data[4:])
            if msg[0] != PING:
                return msg
            self.send(PONG, msg[1])

    def call(self, *fields: Any) -> Any:
        self.send(*fields)
        return self.recv()

    def alive(self) -> bool:
        """The connection still answers (a PING gets its PONG)."""
        self.send(PING, 424242)
        return self.recv() == [PONG, 424242]

    def closed(self) -> bool:
        return self.frame(timeout=10) is None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as b:
        yield b


@pytest.fixture
def wire(broker: BrokerThread) -> Iterator[Wire]:
    w = Wire(broker.port)
    yield w
    w.close()


def wait_for(check: Callable[[], Any], seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while not (got := check()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)
    return got


# --- section 8, replayed from the page --------------------------------------------------


def example_session() -> list[tuple[str, list[str]]]:
    """Section 8's lines as (side, tokens): hex bytes, "quoted text" or xx."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## 8. Example session") : text.index("## 9.")]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    lines: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith(("C:", "S:")):
            lines.append((line[0], []))
            line = line[2:]
        elif not line.strip():
            continue
        # else: an indented line continues the one above
        for tok in re.findall(r'"[^"]*"|\S+', line):
            if not (re.fullmatch(r"[0-9a-f]{2}|xx", tok) or tok.startswith('"')):
                break  # the description at the end of the line
            lines[-1][1].append(tok)
    return lines


def expand(tokens: list[str]) -> list[int | None]:
    """Bytes, with None for each xx."""
    out: list[int | None] = []
    for tok in tokens:
        if tok == "xx":
            out.append(None)
        elif tok.startswith('"'):
            out.extend(tok[1:-1].encode())
        else:
            out.append(int(tok, 16))
    return out


@pytest.mark.parametrize("store", ["memory", "log"])
def test_the_example_session_of_section_8_byte_for_byte(store: str, tmp_path: Path) -> None:
    config: dict[str, Any] = {} if store == "memory" else {"store": LogStore(tmp_path, "batch")}
    lines = example_session()
    assert [side for side, _ in lines] == list("CSCCSSCSCSCSCS"), lines
    with BrokerThread(**config) as broker:
        w = Wire(broker.port, hello=False)
        try:
            xx: list[int] = []  # the bytes the page marks xx, as the broker sent them
            for side, tokens in lines:
                want = expand(tokens)
                if side == "C":
                    w.sock.sendall(bytes(xx.pop(0) if b is None else b for b in want))
                    continue
                got = w.frame()
                if not want:
                    assert got is None, "the broker should close after GOODBYE"
                    continue
                assert got is not None and len(got) == len(want), (got, tokens)
                xx = [g for g, b in zip(got, want, strict=True) if b is None]
                masked = bytes(0 if b is None else g for g, b in zip(got, want, strict=True))
                assert masked == bytes(0 if b is None else b for b in want), got.hex(" ")
        finally:
            w.close()


# --- one exchange per request kind -------------------------------------------------------


def test_hello_is_answered_with_welcome_as_section_3_says(wire: Wire) -> None:
    assert wire.welcome == [WELCOME, 1, "pigeon", 5.0, 16 * 2**20, ["options"]]


def test_put_and_get_and_their_errors(wire: Wire) -> None:
    assert wire.call(GET, 1, "s-put", 1, 0) == [ERROR, 1, "empty", "queue 's-put' is empty"]
    assert wire.call(PUT, 2, "s-put", b"a") == [OK, 2, 1]  # wait and options left out
    assert wire.call(PUT, 3, "s-put", b"b", None, None) == [OK, 3, 1]
    assert wire.call(GET, 4, "s-put", 10, 0) == [DELIVER, 4, [[0, 1, b"a"], [0, 1, b"b"]]]
    # a GET with an extra trailing element (a newer client's field) is served the same
    wire.send(PUT, 5, "s-put", b"c")
    assert wire.recv() == [OK, 5, 1]
    assert wire.call(GET, 6, "s-put", 1, 0, False, None, False, "from the future") == [
        DELIVER, 6, [[0, 1, b"c"]],
    ]  # fmt: skip


def test_put_batch_with_dedup_ids_counts_all_and_stores_the_new_ones(wire: Wire) -> None:
    q = "s-batch"
    assert wire.call(PUT_BATCH, 1, q, [b"a", b"b", b"a2"], 0, None, ["A", "B", "A"]) == [OK, 1, 3]
    assert wire.call(PUT_BATCH, 2, q, [b"b2", b"c"], 0, {}, ["B", "C"]) == [OK, 2, 2]
    assert wire.call(INFO, 3, q)[2]["depth"] == 3  # a, b and c
    refused = wire.call(PUT_BATCH, 4, q, [b"x", b"y"], 0, {"dedup_id": "X"})
    assert refused[:3] == [ERROR, 4, "bad_request"] and "dedup_ids" in refused[3]
    assert wire.call(PUT_BATCH, 5, q, [b"x"], 0, {"dedup_id": ""}, None) == [OK, 5, 1]
    empty_id = wire.call(PUT_BATCH, 6, q, [b"x", b"y"], 0, None, ["X", ""])
    assert empty_id[:3] == [ERROR, 6, "bad_request"] and "dedup_ids" in empty_id[3]
    assert wire.alive()


def test_a_nil_dedup_id_in_a_batch_is_a_protocol_error(wire: Wire) -> None:
    wire.send(PUT_BATCH, 1, "s-batch-nil", [b"x", b"y"], 0, None, ["X", None])
    error = wire.recv()
    assert error[:3] == [ERROR, 0, "protocol"] and "malformed message" in error[3]
    assert wire.closed()


def test_cancel_withdraws_a_parked_get_and_nothing_is_sent_for_it(wire: Wire) -> None:
    wire.send(GET, 1, "s-cancel", 1, None, True)  # parks: no deadline
    wire.send(CANCEL, 1)
    assert wire.call(PUT, 2, "s-cancel", b"x") == [OK, 2, 1]
    assert wire.alive()  # no DELIVER for req 1 came before the PONG
    assert wire.call(INFO, 3, "s-cancel")[2]["depth"] == 1
    wire.send(CANCEL, 99)  # unknown: nothing
    assert wire.alive()


def test_ack_nack_and_extend_answer_settled_and_unknown(wire: Wire) -> None:
    q = "s-settle"
    wire.call(PUT_BATCH, 1, q, [b"a", b"b", b"c"])
    (a, b, c) = wire.call(GET, 2, q, 3, 0, True, 60.0)[2]
    assert [m[1:] for m in (a, b, c)] == [[1, b"a"], [1, b"b"], [1, b"c"]]
    assert all(m[0] > 0 for m in (a, b, c))
    assert wire.call(EXTEND, 3, q, [a[0], 7], 120.0) == [OK, 3, {"settled": 1, "unknown": [7]}]
    assert wire.call(ACK, 4, q, [a[0]]) == [OK, 4, {"settled": 1, "unknown": []}]
    assert wire.call(ACK, 5, q, [a[0]]) == [OK, 5, {"settled": 0, "unknown": [a[0]]}]
    assert wire.call(NACK, 6, q, [b[0]]) == [OK, 6, {"settled": 1, "unknown": []}]
    wire.send(NACK, 7, q, [c[0]], False, 0, "bad input", True)  # quiet: no OK
    assert wire.alive()
    again = wire.call(GET, 8, q, 5, 0, True)
    assert [m[1:] for m in again[2]] == [[2, b"b"]]  # counted again, a new delivery id
    assert again[2][0][0] not in (a[0], b[0], c[0])
    dead = wire.call(PEEK, 9, q + ".dead", 10)[2]
    assert [(d["payload"], d["origin"], d["reason"]) for d in dead] == [(b"c", q, "bad input")]
    wire.send(ACK, 10, q, [again[2][0][0]], True)
    assert wire.alive()


def test_declare_with_nothing_answers_like_info(wire: Wire) -> None:
    info = wire.call(DECLARE, 1, "s-declare", 5, 2.5, 3, 60.0)[2]
    assert set(info) == QUEUE_INFO_KEYS
    assert (info["maxsize"], info["lease"], info["max_deliveries"], info["dedup_window"]) == (
        5, 2.5, 3, 60.0,
    )  # fmt: skip
    assert wire.call(DECLARE, 2, "s-declare", None, None, None, None)[2] == info
    assert wire.call(DECLARE, 3, "s-declare")[2] == info
    assert wire.call(INFO, 4, "s-declare")[2] == info
    fresh = wire.call(INFO, 5, "s-never-made")[2]
    assert fresh["depth"] == 0 and fresh["maxsize"] == 0 and fresh["lease"] == 30.0


def test_task_done_and_join(wire: Wire) -> None:
    q = "s-join"
    assert wire.call(JOIN, 1, q, 0) == [OK, 1, 0]  # nothing unfinished: at once
    wire.call(PUT_BATCH, 2, q, [b"a", b"b"])
    assert wire.call(JOIN, 3, q, 0) == [ERROR, 3, "timeout", "2 tasks unfinished"]
    wire.send(JOIN, 4, q)  # parks
    assert wire.call(TASK_DONE, 5, q) == [OK, 5, 1]
    too_many = wire.call(TASK_DONE, 6, q, 5)
    assert too_many[:3] == [ERROR, 6, "value"]
    wire.send(TASK_DONE, 7, q, 1)
    assert sorted([wire.recv(), wire.recv()]) == [[OK, 4, 0], [OK, 7, 0]]


def test_shutdown_notifies_every_binary_connection(broker: BrokerThread, wire: Wire) -> None:
    other = Wire(broker.port)
    try:
        q = "s-shutdown"
        wire.call(PUT, 1, q, b"left")
        wire.send(SHUTDOWN, 2, q)
        assert wire.recv() == [OK, 2, None]
        assert wire.recv() == [QUEUE_SHUTDOWN, q, False]
        assert other.recv() == [QUEUE_SHUTDOWN, q, False]
        refused = wire.call(PUT, 3, q, b"x")
        assert refused[:3] == [ERROR, 3, "shutdown"]
        assert wire.call(GET, 4, q, 1, 0) == [DELIVER, 4, [[0, 1, b"left"]]]
        assert wire.call(GET, 5, q, 1, 0)[:3] == [ERROR, 5, "shutdown"]
    finally:
        other.close()


def test_purge_delete_peek_and_move(wire: Wire) -> None:
    q, to = "s-admin", "s-admin-to"
    wire.call(PUT, 1, q, b"a", 0, {"priority": 3, "headers": {"k": "v"}})
    wire.call(PUT_BATCH, 2, q, [b"b", b"c", b"d"])
    wire.call(PUT, 3, q, b"later", 0, {"delay": 3600})
    held = wire.call(GET, 4, q, 1, 0, True)[2][0]  # a, the highest priority: in flight
    shown = wire.call(PEEK, 5, q)[2]  # max_items left out: 10
    # not in flight; the delayed one last, with its due
    assert [m["payload"] for m in shown] == [b"b", b"c", b"d", b"later"]
    assert all(set(m) == PEEK_KEYS for m in shown[:-1])
    assert set(shown[-1]) == PEEK_KEYS | {"due"} and 3590 < shown[-1]["due"] <= 3600
    assert shown[0]["headers"] == {} and shown[0]["origin"] == "" and shown[0]["reason"] == ""
    assert [m["payload"] for m in wire.call(PEEK, 6, q, 1)[2]] == [b"b"]
    assert wire.call(MOVE, 7, q, to, 1) == [OK, 7, 1]
    assert wire.call(NACK, 8, q, [held[0]], False) == [OK, 8, {"settled": 1, "unknown": []}]
    assert wire.call(MOVE, 9, q + ".dead", to) == [OK, 9, 1]  # replay the dead letter
    moved = wire.call(PEEK, 10, to)[2]
    assert [(m["payload"], m["priority"], m["headers"]) for m in moved] == [
        (b"a", 3, {"k": "v"}), (b"b", 0, {}),
    ]  # fmt: skip
    assert wire.call(MOVE, 11, to, to)[:3] == [ERROR, 11, "bad_request"]
    assert wire.call(PURGE, 12, q) == [OK, 12, 3]  # c, d and the delayed one
    assert wire.call(INFO, 13, q)[2]["depth"] == 0
    in_flight = wire.call(GET, 14, to, 1, 0, True)[2][0]
    assert wire.call(DELETE, 15, to) == [OK, 15, 2]  # one waiting, one in flight
    gone = {"settled": 0, "unknown": [in_flight[0]]}
    assert wire.call(ACK, 16, to, [in_flight[0]]) == [OK, 16, gone]
    assert wire.call(PURGE, 17, "s-admin-none") == [OK, 17, 0]


def test_stats_ping_and_goodbye(broker: BrokerThread, wire: Wire) -> None:
    stats = wire.call(STATS, 1)[2]
    assert set(stats) == {"queues", "server", "connections"}
    assert any(c["client"] == "spec-test" for c in stats["connections"])
    assert wire.call(PING, 7) == [PONG, 7]
    wire.send(PONG, 8)  # a PONG nobody asked for: ignored
    wire.send(GET, 2, "s-goodbye", 1, 0)
    wire.send(GOODBYE, "done")
    assert wire.recv()[:3] == [ERROR, 2, "empty"]  # answered before the close
    assert wire.closed()  # and no GOODBYE back


def test_the_broker_pings_and_a_client_answers_pong() -> None:
    with BrokerThread(heartbeat=0.2) as broker:
        w = Wire(broker.port)
        try:
            ping = msgspec.msgpack.decode((w.frame() or b"")[4:])
            assert ping[0] == PING and isinstance(ping[1], int)
            w.send(PONG, ping[1])
            assert w.alive()
        finally:
            w.close()


def test_deliver_leaves_headers_out_when_a_message_has_none(wire: Wire) -> None:
    q = "s-headers"
    for req, options in enumerate([None, {}, {"headers": {}}, {"headers": None}], 1):
        wire.call(PUT, req, q, b"a", 0, options)
    wire.call(PUT, 9, q, b"h", 0, {"headers": {"Case": "1", "case": "2", "": "x"}})
    assert wire.call(INFO, 10, q)[2]["depth"] == 4  # an empty header name: not stored
    wire.call(PUT, 11, q, b"h", 0, {"headers": {"Case": "1", "case": "\x00\r\n "}})
    got = wire.call(GET, 12, q, 10, 0)[2]
    assert got == [[0, 1, b"a"]] * 4 + [[0, 1, b"h", {"Case": "1", "case": "\x00\r\n "}]]


def test_a_get_asking_for_message_ids_gets_the_same_id_on_every_delivery(wire: Wire) -> None:
    q = "s-ids"
    wire.call(PUT_BATCH, 1, q, [b"same"] * 5)
    plain = wire.call(GET, 2, q, 10, 0, True, None, True)[2]  # plain ones: taken in bulk
    wire.call(PUT, 3, q, b"h", 0, {"headers": {"k": "v"}})
    headed = wire.call(GET, 4, q, 10, 0, True, None, True)[2]
    first = plain + headed
    assert [(len(e), e[1:4]) for e in first] == [(5, [1, b"same", None])] * 5 + [
        (5, [1, b"h", {"k": "v"}])
    ]
    ids = [e[4] for e in first]
    assert len(set(ids)) == 6 and all(isinstance(i, int) and i > 0 for i in ids)
    wire.call(NACK, 5, q, [e[0] for e in first])
    again = wire.call(GET, 6, q, 10, 0, True, None, True)[2]
    assert [(e[1], e[4]) for e in again] == [(2, i) for i in ids]  # a new delivery, one id
    assert not {e[0] for e in again} & {e[0] for e in first}
    wire.call(NACK, 7, q, [e[0] for e in again])
    asked_not = wire.call(GET, 8, q, 10, 0, True)[2]  # the entries as before: 3 or 4 long
    assert [len(e) for e in asked_not] == [3] * 5 + [4]


# --- errors: which close the connection, which do not -----------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"priority": 5.0}, "priority"),
        ({"headers": {"k": 1}}, "headers"),
        ({"delay": "soon"}, "delay"),
        ({"ttl": -0.5}, "ttl"),
        ({"dedup_id": ""}, None),  # "" is none
        ({"headers": None}, None),
        ({1: "an integer key", "later": {"a": [1]}}, None),
    ],
)
def test_an_options_entry_never_closes_the_connection(
    wire: Wire, options: dict[Any, Any], field: str | None
) -> None:
    reply = wire.call(PUT, 1, "s-options", b"x", 0, options)
    if field is None:
        assert reply == [OK, 1, 1]
    else:
        assert reply[:3] == [ERROR, 1, "bad_request"] and reply[3].startswith(field + " must")
    assert wire.alive()


def test_ttl_zero_is_none_and_the_message_says_so(wire: Wire) -> None:
    assert wire.call(PUT, 1, "s-ttl", b"x", 0, {"ttl": 0}) == [OK, 1, 1]
    assert wire.call(PUT, 2, "s-ttl", b"x", 0, {"ttl": -0.5}) == [
        ERROR, 2, "bad_request",
        "ttl must be a finite number of seconds from 0 (none) to 31622400, not -0.5",
    ]  # fmt: skip


def test_a_field_of_the_wrong_type_is_a_protocol_error_and_closes(wire: Wire) -> None:
    wire.send(PUT, 1, "s-protocol", b"a")
    wire.send(GET, 2, "s-protocol", 1.5, 0)  # max_items a float
    assert wire.recv() == [OK, 1, 1]  # what came before is answered
    error = wire.recv()
    assert error[:3] == [ERROR, 0, "protocol"] and "malformed message" in error[3]
    assert wire.closed()


def test_options_that_are_not_a_map_are_a_protocol_error(wire: Wire) -> None:
    wire.send(PUT, 1, "s-protocol", b"a", 0, ["delay", 1])
    assert wire.recv()[:3] == [ERROR, 0, "protocol"]
    assert wire.closed()


def test_a_value_nested_too_deeply_is_a_protocol_error_with_its_error(wire: Wire) -> None:
    body = b"\x96\x10\x01\xa6s-deep\xc4\x01x\x00\x81\xa1x" + b"\x91" * 100_000 + b"\x01"
    wire.sock.sendall(struct.pack(">I", len(body)) + body)
    error = wire.recv()
    assert error[:3] == [ERROR, 0, "protocol"] and "nested too deeply" in error[3]
    assert wire.closed()


def test_a_value_out_of_range_is_a_bad_request_naming_the_field(wire: Wire) -> None:
    assert wire.call(GET, 1, "s-range", 0, 0) == [
        ERROR, 1, "bad_request", "max_items must be an integer from 1 to 10000, not 0",
    ]  # fmt: skip
    assert wire.call(PUT, 0, "s-range", b"x")[:3] == [ERROR, 0, "bad_request"]
    assert wire.call(INFO, 2, "two words")[:3] == [ERROR, 2, "bad_request"]
    assert wire.alive()


# --- the order and the dead letters of section 6 ---------------------------------------


def test_priority_first_then_put_order_whatever_came_back(wire: Wire) -> None:
    q = "s-order"
    wire.call(PUT, 1, q, b"old-p0")
    old = wire.call(GET, 2, q, 1, 0, True)[2][0]
    wire.call(PUT, 3, q, b"new-p0")
    wire.call(PUT, 4, q, b"new-p9", 0, {"priority": 9})
    wire.call(NACK, 5, q, [old[0]])
    got = wire.call(GET, 6, q, 10, 0)[2]
    assert [m[2] for m in got] == [b"new-p9", b"old-p0", b"new-p0"]


def test_a_delayed_message_takes_its_place_by_put_order(wire: Wire) -> None:
    q = "s-delay"
    wire.call(PUT, 1, q, b"A", 0, {"delay": 2.0})  # long enough for B and C to come first
    wire.call(PUT, 2, q, b"B")
    assert wire.call(GET, 3, q, 1, 0)[2] == [[0, 1, b"B"]]
    wire.call(PUT, 4, q, b"C")
    wait_for(lambda: wire.call(INFO, 5, q)[2]["delayed"] == 0)
    wire.call(PUT, 6, q, b"D")
    assert [m[2] for m in wire.call(GET, 7, q, 10, 0)[2]] == [b"A", b"C", b"D"]


def test_an_expired_message_is_a_dead_letter_with_its_reason_origin_and_priority(
    wire: Wire,
) -> None:
    q = "s-expire"
    wire.call(PUT, 1, q, b"exp", 0, {"ttl": 0.2, "priority": 6, "headers": {"why": "ttl"}})
    dead = wait_for(lambda: wire.call(PEEK, 2, q + ".dead")[2])
    (d,) = dead
    assert (d["payload"], d["origin"], d["reason"], d["priority"], d["headers"]) == (
        b"exp", q, "expired", 6, {"why": "ttl"},
    )  # fmt: skip
    assert wire.call(INFO, 3, q)[2]["unfinished"] == 0
    assert wire.call(INFO, 4, q + ".dead")[2]["unfinished"] == 1
    # its DELIVER carries neither origin nor reason, and its count starts again
    assert wire.call(GET, 5, q + ".dead", 1, 0)[2] == [[0, 1, b"exp", {"why": "ttl"}]]


def test_a_dedup_window_starts_at_the_stored_put_and_repeats_do_not_renew_it(
    wire: Wire,
) -> None:
    q, window = "s-window", 3.0
    wire.call(DECLARE, 1, q, None, None, None, window)
    assert wire.call(PUT, 2, q, b"first", 0, {"dedup_id": "d"}) == [OK, 2, 1]
    stored = time.monotonic()  # the broker remembered the id before this
    time.sleep(window / 2)
    assert wire.call(PUT, 3, q, b"repeat", 0, {"dedup_id": "d"}) == [OK, 3, 1]
    assert wire.call(INFO, 4, q)[2]["depth"] == 1
    # past the window of the first put, within that of the repeat: the id is new again
    time.sleep(max(0.0, window + 0.3 - (time.monotonic() - stored)))
    assert wire.call(PUT, 5, q, b"again", 0, {"dedup_id": "d"}) == [OK, 5, 1]
    assert wire.call(INFO, 6, q)[2]["depth"] == 2


# --- text mode ---------------------------------------------------------------------------


def test_text_mode_lines_and_replies(broker: BrokerThread) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
        s.sendall(
            b"put s-text hello world priority=2 priority=5\r\n"
            b"PUT s-text plain\n"
            b"PUT s-text x priority=high\n"
            b"QSIZE s-text\nGET s-text\nGET s-text\nGET s-text\nPING\nQUIT\n"
        )
        data = b""
        while not data.endswith(b"+BYE\r\n"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert data.split(b"\r\n") == [
        b"+OK",
        b"+OK",
        b"-BAD_REQUEST priority must be an integer from 0 to 9, not 'high'",
        b":2",
        b"+hello world",
        b"+plain",
        b"-EMPTY queue 's-text' is empty",
        b"+PONG",
        b"+BYE",
        b"",
    ]


# --- Hypothesis: any options map, against the broker (FINDINGS-spec #9) -----------------


def _str_header(n: int) -> bytes:
    return bytes([0xA0 | n])


def _map(entries: list[tuple[bytes, bytes]]) -> bytes:
    return bytes([0x80 | len(entries)]) + b"".join(k + v for k, v in entries)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
).map(msgspec.msgpack.encode) | st.binary(max_size=4).map(lambda b: _str_header(len(b)) + b)
_values = st.recursive(
    _scalars,
    lambda kids: (
        st.lists(kids, max_size=3).map(lambda xs: bytes([0x90 | len(xs)]) + b"".join(xs))
        | st.lists(st.tuples(kids, kids), max_size=3).map(_map)
    ),
    max_leaves=8,
)
_KNOWN = ("delay", "ttl", "dedup_id", "priority", "headers")
_keys = st.sampled_from(_KNOWN).map(msgspec.msgpack.encode) | _values
_options = st.lists(st.tuples(_keys, _values), max_size=6).map(_map)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(options=_options)
def test_any_options_map_is_accepted_or_refused_naming_a_field_never_closed(
    wire: Wire, options: bytes
) -> None:
    body = b"\x96\x10\x01\xa6s-fuzz\xc4\x01x\x00" + options  # PUT req=1 "s-fuzz" b"x" 0 options
    wire.sock.sendall(struct.pack(">I", len(body)) + body)
    reply = wire.recv()
    if reply[0] == OK:
        assert reply == [OK, 1, 1]
    else:
        assert reply[:3] == [ERROR, 1, "bad_request"], reply
        assert reply[3].split(" ")[0].rstrip(":") in _KNOWN, reply[3]
    assert wire.alive()


def test_peek_shows_the_order_of_delivery_when_a_delay_ended_behind_older_messages(
    wire: Wire,
) -> None:
    q = "s-peek-order"
    wire.call(PUT, 1, q, b"older")
    wire.call(PUT, 2, q, b"delayed", 0, {"delay": 0.2})
    wire.call(PUT, 3, q, b"newer")
    wait_for(lambda: wire.call(INFO, 4, q)[2]["delayed"] == 0)
    peeked = [m["payload"] for m in wire.call(PEEK, 5, q)[2]]
    delivered = [m[2] for m in wire.call(GET, 6, q, 10, 0)[2]]
    assert peeked == delivered == [b"older", b"delayed", b"newer"]


def test_a_req_still_parked_cannot_be_reused_one_answered_can(wire: Wire) -> None:
    q = "s-req"
    wire.send(GET, 1, q, 1, None)  # parks
    reused = wire.call(INFO, 1, q)
    assert reused[:3] == [ERROR, 1, "bad_request"] and "still waiting" in reused[3]
    wire.send(CANCEL, 1)
    assert wire.call(INFO, 1, q)[:2] == [OK, 1]  # withdrawn: free again
    assert wire.call(INFO, 1, q)[:2] == [OK, 1]  # answered: free again


def test_a_ttl_put_straight_into_a_dead_letter_queue_drops_the_message(wire: Wire) -> None:
    q = "s-dead-ttl.dead"
    wire.call(PUT, 1, q, b"by hand", 0, {"ttl": 0.2})
    wire.call(PUT, 2, q, b"kept")
    info = wait_for(lambda: (i := wire.call(INFO, 3, q)[2])["depth"] == 1 and i)
    assert (info["dead_total"], info["unfinished"]) == (1, 1)
    assert [m["payload"] for m in wire.call(PEEK, 4, q)[2]] == [b"kept"]
    assert wire.call(INFO, 5, q + ".dead")[2]["depth"] == 0  # no NAME.dead.dead


def test_the_reply_bound_refuses_a_put_no_reply_could_carry_and_bounds_peek() -> None:
    # max_reply_bytes: min(max_frame_size, max(max_pending_output - 64 KiB, half of it))
    with BrokerThread(max_frame_size=200_000, max_pending_output=150_000) as broker:
        w = Wire(broker.port)  # max_reply_bytes 84,464
        try:
            q = "s-bound"
            refused = w.call(PUT, 1, q, b"x" * 90_000)
            assert refused[:3] == [ERROR, 1, "too_large"] and "nothing was stored" in refused[3]
            assert "max_reply_bytes=84464" in refused[3]
            headers = {f"h{i}": "v" * 250 for i in range(60)}  # 15 KiB of headers
            for req in (2, 3, 4):
                assert w.call(PUT, req, q, b"y" * 25_000, 0, {"headers": headers}) == [OK, req, 1]
            assert w.call(INFO, 5, q)[2]["depth"] == 3
            assert len(w.call(PEEK, 6, q, 10)[2]) == 2  # 2 x 40 KB fit, 3 would not
            got = w.call(GET, 7, q, 10, 0)
            assert len(got[2]) == 2 and len(msgspec.msgpack.encode(got)) <= 84_464
        finally:
            w.close()
