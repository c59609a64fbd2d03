"""The broker's side of a text-mode conversation, bytes in and events out, without a
socket (``pigeon.protocol.text.TextConnection``)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.protocol import (
    Deliver,
    Delivery,
    Error,
    Get,
    Info,
    Ok,
    Put,
    PutOptions,
    QueueShutdown,
    Shutdown,
    Stats,
)
from pigeon.protocol.codes import Code
from pigeon.protocol.messages import Confirmed
from pigeon.protocol.text import (
    MAX_HELD,
    MAX_LINE,
    DrainRequested,
    LoginRequested,
    RequestReceived,
    State,
    TextConnection,
    Violation,
)
from tests._chunks import split

REFUSED = b"-ERR auth: this broker needs a token; send AUTH <token> first\r\n"


def answer(message: Any) -> Any:
    """What a broker says to each request, for the tests: a fixed reply per kind."""
    req = message.req
    if isinstance(message, Put):
        return Confirmed(req, 1)
    if isinstance(message, Get):
        if message.queue == "empty":
            return Error(req, Code.EMPTY, "queue 'empty' is empty")
        return Deliver(req, [Delivery(0, 1, message.queue.encode())])
    if isinstance(message, Info):
        return Ok(req, {"depth": len(message.queue)})
    if isinstance(message, Stats):
        return Ok(req, {"queues": {}})
    return Ok(req, None)


class Shell:
    """A shell that answers each request and login at once (``TOKEN`` is the right
    token), or keeps the requests to answer later (``hold=True``)."""

    TOKEN = "s3cret"

    def __init__(
        self, token_required: bool = False, hold: bool = False, max_line: int = MAX_LINE
    ) -> None:
        self.conv = TextConnection(token_required=token_required, max_line=max_line)
        self.hold = hold
        self.events: list[Any] = []
        self.held: list[Any] = []
        self.out = b""

    def feed(self, *chunks: bytes) -> Shell:
        for chunk in chunks:
            self.act(self.conv.receive_data(chunk))
        return self

    def act(self, events: list[Any]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, RequestReceived):
                if self.hold:
                    self.held.append(ev.message)
                else:
                    self.conv.reply(ev.message.req, answer(ev.message))
            elif isinstance(ev, LoginRequested):
                ok = ev.token == self.TOKEN
                self.act(self.conv.logged_in() if ok else self.conv.login_failed())
        self.out += self.conv.data_to_send()

    def answer_held(self, order: list[int]) -> None:
        for i in order:
            msg = self.held[i]
            self.conv.reply(msg.req, answer(msg))
            self.out += self.conv.data_to_send()


SESSION = (
    b"PUT jobs hello world\r\nQSIZE jobs\nGET jobs\nGET empty 0.5\n\nping\nSTATS\n"
    b"PUT jobs later delay=5 priority=7 header.k=v\nSHUTDOWN jobs\nHELP\nNOPE x\nQUIT\n"
    b"PUT jobs never\n"
)
SESSION_EVENTS = [
    RequestReceived(Put(1, "jobs", b"hello world", 0.0, None)),
    RequestReceived(Info(2, "jobs")),
    RequestReceived(Get(3, "jobs", 1, 0.0)),
    RequestReceived(Get(4, "empty", 1, 0.5)),
    RequestReceived(Stats(5)),
    RequestReceived(
        Put(6, "jobs", b"later", 0.0, PutOptions(delay=5.0, priority=7, headers={"k": "v"}))
    ),
    RequestReceived(Shutdown(7, "jobs")),
    DrainRequested("QUIT"),
]
SESSION_REPLIES = [
    "+OK",
    ":4",
    "+jobs",
    "-EMPTY queue 'empty' is empty",
    "+PONG",
    '+{"queues":{}}',
    "+OK",
    "+OK",
    "+commands (one per line, \\r\\n or \\n; replies come back in command order):",
    "+  PUT <queue> <text>       put the text (UTF-8 bytes) as one item; options at the",
    "+                           end: delay=S ttl=S priority=0-9 dedup_id=ID header.K=V",
    "+  GET <queue> [seconds]    take one item (+text, or $base64 for binary)",
    "+  QSIZE <queue>            items waiting",
    "+  SHUTDOWN <queue>         shut the queue down",
    "+  STATS                    broker statistics as JSON",
    "+  PING | HELP | QUIT",
    "-ERR unknown command 'NOPE'; try HELP",
    "+BYE",
]


def test_a_whole_session_in_one_read() -> None:
    shell = Shell().feed(SESSION)
    assert shell.events == SESSION_EVENTS
    assert shell.out.decode().split("\r\n") == [*SESSION_REPLIES, ""]
    assert shell.conv.state is State.DRAINING and shell.conv.unanswered == 0


def test_the_session_fed_byte_by_byte() -> None:
    shell = Shell().feed(*(SESSION[i : i + 1] for i in range(len(SESSION))))
    assert shell.events == SESSION_EVENTS
    assert shell.out.decode().split("\r\n") == [*SESSION_REPLIES, ""]


@given(st.lists(st.integers(min_value=0, max_value=1000), max_size=30))
@settings(max_examples=200)
def test_any_split_of_the_stream_gives_the_same_events_and_replies(cuts: list[int]) -> None:
    shell = Shell().feed(*split(SESSION, cuts))
    assert shell.events == SESSION_EVENTS
    assert shell.out.decode().split("\r\n") == [*SESSION_REPLIES, ""]


@given(st.permutations(range(7)))
@settings(max_examples=100)
def test_replies_leave_in_command_order_whatever_order_the_broker_answers(
    order: list[int],
) -> None:
    shell = Shell(hold=True).feed(SESSION)
    assert len(shell.held) == 7
    assert shell.out == b""  # the first command's reply is not there yet: nothing goes
    shell.answer_held(order)
    assert shell.out.decode().split("\r\n") == [*SESSION_REPLIES, ""]


LOGIN = (
    b"PUT jobs x\r\nHELP\r\nAUTH wrong\r\nPING\r\nAUTH s3cret\r\nAUTH again\r\nGET jobs\r\nQUIT\r\n"
)


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=20))
@settings(max_examples=200)
def test_any_split_of_a_login_gives_the_same_events_and_replies(cuts: list[int]) -> None:
    shell = Shell(token_required=True).feed(*split(LOGIN, cuts))
    assert shell.events == [
        LoginRequested("wrong"),
        LoginRequested("s3cret"),
        RequestReceived(Get(1, "jobs", 1, 0.0)),
        DrainRequested("QUIT"),
    ]
    lines = shell.out.split(b"\r\n")
    assert lines[0] + b"\r\n" == REFUSED  # PUT before AUTH
    assert [line.decode() for line in lines[1:9]] == SESSION_REPLIES[8:16]  # HELP
    assert lines[9:] == [
        b"-ERR auth: wrong token",
        REFUSED.rstrip(),  # PING: still not logged in
        b"+OK",
        b"+OK",  # AUTH once logged in
        b"+jobs",
        b"+BYE",
        b"",
    ]
    assert shell.conv.failures == 1


def test_a_wrong_auth_holds_every_later_byte_until_the_answer() -> None:
    conv = TextConnection(token_required=True)
    assert conv.receive_data(b"AUTH wrong\nPING\nAUTH s3") == [LoginRequested("wrong")]
    assert conv.state is State.CHECKING and conv.auth_pending
    assert conv.receive_data(b"cret\nGET jobs\n") == []  # held, not read
    assert conv.data_to_send() == b"" and conv.unanswered == 1
    assert conv.login_failed() == [LoginRequested("s3cret")]  # the held lines run
    assert conv.data_to_send() == b"-ERR auth: wrong token\r\n" + REFUSED
    assert conv.logged_in() == [RequestReceived(Get(1, "jobs", 1, 0.0))]
    assert conv.data_to_send() == b"+OK\r\n"
    assert conv.state is State.OPEN and conv.handshake_done


def test_the_third_wrong_token_ends_the_conversation() -> None:
    conv = TextConnection(token_required=True)
    events = conv.receive_data(b"AUTH a\nAUTH b\nAUTH c\nAUTH s3cret\nPING\n")
    assert events == [LoginRequested("a")]
    assert conv.login_failed() == [LoginRequested("b")]
    assert conv.login_failed() == [LoginRequested("c")]
    assert conv.login_failed() == [DrainRequested("3 wrong tokens")]
    assert conv.data_to_send() == b"-ERR auth: wrong token\r\n" * 3
    assert conv.state is State.DRAINING and conv.buffered == 0 and not conv.handshake_done
    assert conv.receive_data(b"PING\n") == []


def test_bytes_held_behind_an_auth_are_bounded() -> None:
    conv = TextConnection(token_required=True)
    conv.receive_data(b"AUTH wrong\n")
    conv.receive_data(b"PING\n" * (MAX_HELD // 5))
    assert conv.buffered <= MAX_HELD
    (ev,) = conv.receive_data(b"PING\n")
    assert isinstance(ev, Violation) and f"more than {MAX_HELD} bytes" in ev.reason
    assert conv.buffered == 0 and conv.state is State.DRAINING
    assert conv.data_to_send() == b""  # the violation waits behind the AUTH's answer
    assert conv.login_failed() == []  # answered still (after the shell's delay) ...
    assert conv.data_to_send().split(b"\r\n")[:2] == [
        b"-ERR auth: wrong token",  # ... and first
        f"-ERR protocol: more than {MAX_HELD} bytes sent while an AUTH waits for its "
        "answer".encode(),
    ]
    assert conv.unanswered == 0


def test_with_a_token_only_auth_help_and_quit_are_read_before_login() -> None:
    conv = TextConnection(token_required=True)
    assert conv.receive_data(b"GET jobs\nQSIZE jobs\nSTATS\n") == []
    assert conv.data_to_send() == REFUSED * 3
    assert conv.receive_data(b"QUIT\n") == [DrainRequested("QUIT")]
    assert conv.data_to_send() == b"+BYE\r\n" and not conv.handshake_done


def test_without_a_token_auth_is_refused_and_the_first_line_ends_the_handshake() -> None:
    conv = TextConnection(token_required=False)
    assert conv.receive_data(b"AUTH x") == [] and conv.state is State.GREETING
    assert not conv.handshake_done  # no whole line yet
    assert conv.receive_data(b"\r\n") == [] and conv.handshake_done
    assert conv.data_to_send() == b"-ERR this broker needs no AUTH\r\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PING\r\nPUT jobs a\x01b\nPING\n", "byte 0x01 is not text"),
        (b"PING\r\nPUT jobs \xc0\x80\n", "byte 0xc0 is not text"),
        (b"PING\r\nPUT jobs \xe2\x82\n", "lines must be UTF-8 text"),
        (b"PING\r\n" + b"x" * (MAX_LINE + 1), f"exceeds max_length={MAX_LINE}"),
        (b"PING\r\n" + b"x" * (MAX_LINE + 1) + b"\n", f"exceeds max_length={MAX_LINE}"),
    ],
)
def test_bytes_that_are_not_text_end_the_conversation_after_the_lines_before_them(
    data: bytes, reason: str
) -> None:
    for chunks in ([data], [data[:3], data[3:]], [data[i : i + 1] for i in range(len(data))]):
        conv = TextConnection(token_required=False)
        events = [ev for chunk in chunks for ev in conv.receive_data(chunk)]
        (violation,) = events
        assert isinstance(violation, Violation) and reason in violation.reason
        out = conv.data_to_send()
        assert out.startswith(b"+PONG\r\n-ERR protocol: ") and out.count(b"\r\n") == 2
        assert reason.encode() in out
        assert conv.state is State.DRAINING and conv.buffered == 0


def test_a_line_of_64_kib_is_a_command() -> None:
    line = b"PUT jobs " + b"x" * (MAX_LINE - 9)
    shell = Shell().feed(line[:1000], line[1000:] + b"\n")
    assert shell.events == [RequestReceived(Put(1, "jobs", b"x" * (MAX_LINE - 9), 0.0, None))]


PIECES = [
    *(b"PING\n", b"AUTH s3cret\n", b"AUTH no\r\n", b"GET q\n", b"PUT q x\n", b"QUIT\n"),
    *(b"\n", b"\r", b" ", b"x" * 40, b"\x00", b"\x7f", b"\xff", b"\xc3\xa9", b"\xe2\x82"),
]
GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=400),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=40).map(b"".join),
)


@given(GARBAGE, st.lists(st.integers(0, 500), max_size=8), st.booleans())
@settings(max_examples=400)
def test_garbage_ends_in_one_violation_at_most_and_is_never_buffered_without_bound(
    garbage: bytes, cuts: list[int], token: bool
) -> None:
    """Any bytes: events for the lines that parse, then at most one violation with its
    ``-ERR protocol`` line, and nothing at all after it; no exception, and never more
    buffered than one line."""
    shell = Shell(token_required=token, max_line=64)
    for chunk in split(garbage, cuts):
        shell.feed(chunk)
        assert shell.conv.buffered <= 64 + 1
    events = shell.events
    violations = [i for i, e in enumerate(events) if isinstance(e, Violation)]
    assert len(violations) <= 1
    if violations:
        assert violations[0] == len(events) - 1
        assert shell.conv.state is State.DRAINING
        assert shell.out.count(b"-ERR protocol: ") == 1
        assert shell.out.endswith(b"\r\n") and shell.conv.receive_data(b"PING\n") == []
    assert shell.conv.unanswered == 0  # every command read was answered


def test_a_half_close_asks_to_drain_once_the_lines_before_it_have_run() -> None:
    conv = TextConnection(token_required=True)
    conv.receive_data(b"AUTH wrong\nHELP\n")
    assert conv.receive_data(b"") == []  # behind the pending AUTH, like the lines
    events = conv.login_failed()
    assert events == [DrainRequested("the client half-closed")]
    assert conv.data_to_send().startswith(b"-ERR auth: wrong token\r\n+commands")
    assert conv.receive_data(b"PING\n") == []


def test_a_last_line_without_newline_before_the_half_close_is_ignored() -> None:
    shell = Shell().feed(b"PING\nPING", b"")
    assert shell.out == b"+PONG\r\n"
    assert shell.events == [DrainRequested("the client half-closed")]


USAGE_OPTIONS = "[delay=S] [ttl=S] [priority=0-9] [dedup_id=ID] [header.NAME=VALUE]"
NOT_A_PRIORITY = "must be an integer from 0 to 9, not"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"PUT", f"-ERR usage: PUT <queue> <text> {USAGE_OPTIONS}"),
        (b"PUT jobs x priority=high", f"-BAD_REQUEST priority {NOT_A_PRIORITY} 'high'"),
        (b"PUT jobs x dedup_id=", "-BAD_REQUEST dedup_id must not be empty"),
        (b"GET", "-ERR usage: GET <queue> [wait seconds]"),
        (b"get jobs soon", "-ERR wait must be a number of seconds, not 'soon'"),
    ],
)
def test_commands_that_need_nothing_but_their_turn_are_answered_inside(
    line: bytes, reply: str
) -> None:
    conv = TextConnection(token_required=False)
    assert conv.receive_data(line + b"\n") == []
    assert conv.data_to_send() == reply.encode() + b"\r\n"


def test_how_the_brokers_replies_read() -> None:
    conv = TextConnection(token_required=False)
    events = conv.receive_data(b"GET a\nGET b\nGET c\nQSIZE a\nPUT a x\nSTATS\n")
    reqs = [ev.message.req for ev in events]
    conv.reply(reqs[0], Deliver(reqs[0], [Delivery(0, 1, "héllo".encode())]))
    conv.reply(reqs[1], Deliver(reqs[1], [Delivery(0, 1, b"a\tb\xff")]))
    conv.reply(reqs[2], Error(reqs[2], Code.SHUTDOWN, "queue 'c' was shut down"))
    conv.reply(reqs[3], Ok(reqs[3], {"depth": 12}))
    conv.reply(reqs[4], Error(reqs[4], Code.UNAVAILABLE, "the store is stalled"))
    conv.reply(reqs[5], Ok(reqs[5], {"server": {"name": "p"}}))
    conv.reply(99, QueueShutdown("a"))  # a notice, or no request of this conversation
    assert conv.data_to_send().decode().split("\r\n") == [
        "+héllo",
        "$" + base64.b64encode(b"a\tb\xff").decode(),
        "-SHUTDOWN queue 'c' was shut down",
        ":12",
        "-UNAVAILABLE the store is stalled",
        "+" + json.dumps({"server": {"name": "p"}}, separators=(",", ":")),
        "",
    ]


def test_a_refusal_and_the_brokers_goodbye_take_their_turn() -> None:
    conv = TextConnection(token_required=False)
    (get,) = conv.receive_data(b"GET jobs 5\n")
    conv.refuse("idle", "no request for more than 300 s")
    assert conv.state is State.DRAINING and conv.data_to_send() == b""  # behind the GET
    conv.goodbye("broker stopping")
    conv.reply(get.message.req, Error(get.message.req, "empty", "queue 'jobs' is empty"))
    assert conv.data_to_send() == (
        b"-EMPTY queue 'jobs' is empty\r\n-ERR idle: no request for more than 300 s\r\n"
        b"-ERR broker stopping\r\n"
    )
    assert conv.receive_data(b"PING\n") == [] and conv.unanswered == 0


def test_commands_waiting_behind_an_unanswered_one_are_bounded() -> None:
    # A GET that waits holds every reply behind it in its turn: 10,000 STATS lines behind
    # it were all run and their replies kept (RSS +150 MiB); now the conversation stops
    # running lines at MAX_WAITING and the shell stops reading.
    from pigeon.protocol.text import MAX_WAITING

    conv = TextConnection(token_required=False)
    (get,) = conv.receive_data(b"GET q 600\r\n")
    assert isinstance(get, RequestReceived)
    events = conv.receive_data(b"PING\r\n" * (2 * MAX_WAITING))
    assert events == [] and conv.backlogged and conv.unanswered == MAX_WAITING
    assert conv.data_to_send() == b""  # every PONG waits its turn behind the GET
    conv.reply(get.message.req, Error(get.message.req, Code.EMPTY, "queue 'q' is empty"))
    assert not conv.backlogged
    assert conv.resume() == [] and conv.unanswered == 0  # the rest ran: PONGs need no broker
    out = conv.data_to_send()
    assert (
        out.startswith(b"-EMPTY queue 'q' is empty\r\n") and out.count(b"+PONG") == 2 * MAX_WAITING
    )


def test_a_text_puts_headers_keep_the_order_of_the_line() -> None:
    conv = TextConnection(token_required=False)
    (put,) = conv.receive_data(b"PUT q hello header.first=1 header.second=2 header.third=3\r\n")
    assert isinstance(put, RequestReceived)
    assert list(put.message.options.headers) == ["first", "second", "third"]
