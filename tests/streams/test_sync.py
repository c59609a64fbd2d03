from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pigeon.errors import BrokenResourceError, ClosedResourceError, FrameTooLarge, IncompleteFrame
from pigeon.framing import Delimited, FixedLength, LengthPrefixed
from pigeon.streams import FramedSocket, connect


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


@pytest.fixture(params=["socketpair", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair() if request.param == "socketpair" else _tcp_pair()
    yield a, b
    a.close()
    b.close()


def test_send_and_recv_frames(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with FramedSocket(a) as fa, FramedSocket(b) as fb:
        fa.send(b"one")
        fa.send_many([b"two", b"", b"three" * 1000])
        assert [fb.recv() for _ in range(4)] == [b"one", b"two", b"", b"three" * 1000]


def test_recv_returns_none_at_clean_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with FramedSocket(a) as fa, FramedSocket(b) as fb:
        fa.send(b"last")
        fa.close()
        assert fb.recv() == b"last"
        assert fb.recv() is None
        assert fb.recv() is None


def test_recv_raises_incomplete_frame_at_eof_mid_frame(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    with FramedSocket(b) as fb:
        a.sendall(b"\x00\x00\x00\x0aabc")
        a.close()
        with pytest.raises(IncompleteFrame, match=r"3 of 10 body bytes received"):
            fb.recv()


def test_half_close_keeps_the_other_direction_open(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    with FramedSocket(a) as client, FramedSocket(b) as server:

        def serve() -> None:
            got = list(server)
            server.send_many([f"got {len(got)}".encode(), *got])
            server.shutdown_write()

        t = threading.Thread(target=serve)
        t.start()
        client.send_many([b"a", b"b", b"c"])
        client.shutdown_write()
        with pytest.raises(BrokenResourceError):
            # our write side is shut: sending now is an error, not silent loss
            client.send(b"too late")
        assert list(client) == [b"got 3", b"a", b"b", b"c"]
        t.join()


def test_send_many_large_batch_over_tcp_is_complete() -> None:
    a, b = _tcp_pair()
    payloads = [i.to_bytes(4, "big") * (i % 50) for i in range(20_000)]
    with FramedSocket(a) as fa, FramedSocket(b) as fb:
        t = threading.Thread(target=lambda: (fa.send_many(payloads), fa.shutdown_write()))
        t.start()
        assert list(fb) == payloads
        t.join()


@pytest.mark.parametrize(
    "codec", [Delimited(), FixedLength(3), LengthPrefixed(header_size=2)], ids=repr
)
def test_any_codec(codec: Delimited | FixedLength | LengthPrefixed) -> None:
    a, b = socket.socketpair()
    with FramedSocket(a, codec) as fa, FramedSocket(b, codec) as fb:
        fa.send_many([b"abc", b"def"])
        fa.shutdown_write()
        assert list(fb) == [b"abc", b"def"]


def test_oversized_header_is_refused() -> None:
    a, b = socket.socketpair()
    with a, FramedSocket(b, LengthPrefixed(max_frame_size=100)) as fb:
        a.sendall(LengthPrefixed().encode(b"ok") + b"\xff\xff\xff\xff")
        assert fb.recv() == b"ok"
        with pytest.raises(FrameTooLarge, match="frame of 4294967295 bytes exceeds"):
            fb.recv()


def test_tcp_nodelay_is_set() -> None:
    a, b = _tcp_pair()
    with FramedSocket(a) as fa, b:
        assert fa.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_use_after_close_is_an_error() -> None:
    a, b = socket.socketpair()
    fa = FramedSocket(a)
    fa.close()
    b.close()
    with pytest.raises(ClosedResourceError, match="was closed"):
        fa.send(b"x")
    with pytest.raises(ClosedResourceError):
        fa.recv()


def test_connect_refused_is_broken_resource() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BrokenResourceError, match=f"cannot connect to 127.0.0.1:{port}"):
        connect("127.0.0.1", port, timeout=2)


def test_recv_timeout_follows_the_socket() -> None:
    a, b = socket.socketpair()
    b.settimeout(0.05)
    with a, FramedSocket(b) as fb, pytest.raises(TimeoutError):
        fb.recv()
