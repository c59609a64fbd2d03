from __future__ import annotations

import asyncio
import socket

import pytest

from pigeon.errors import ClosedResourceError, FrameTooLarge, IncompleteFrame
from pigeon.framing import Delimited, LengthPrefixed
from pigeon.streams import FramedStream, open_framed_connection, start_framed_server


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_echo_over_tcp_with_half_close() -> None:
    async def main() -> list[bytes]:
        async def handler(stream: FramedStream) -> None:
            got = [frame async for frame in stream]  # until the client's FIN
            await stream.send_many([f"got {len(got)}".encode(), *got])
            await stream.shutdown_write()

        server = await start_framed_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            client = await open_framed_connection("127.0.0.1", port)
            async with client:
                await client.send_many([b"a", b"", b"c" * 100_000])
                await client.send(b"d")
                await client.shutdown_write()
                return [f async for f in client]

    assert run(main()) == [b"got 4", b"a", b"", b"c" * 100_000, b"d"]


def test_socketpair_and_other_codec() -> None:
    async def main() -> list[bytes]:
        a, b = socket.socketpair()
        sa = await open_framed_connection(sock=a, codec=Delimited())
        sb = await open_framed_connection(sock=b, codec=Delimited())
        await sa.send_many([b"x", b"y"])
        await sa.shutdown_write()
        got = [f async for f in sb]
        await sa.aclose()
        await sb.aclose()
        return got

    assert run(main()) == [b"x", b"y"]


def test_eof_mid_frame_raises_incomplete_frame() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        sb = await open_framed_connection(sock=b)
        a.sendall(b"\x00\x00\x00\x05ab")
        a.close()
        try:
            with pytest.raises(IncompleteFrame, match="2 of 5 body bytes received"):
                await sb.recv()
        finally:
            await sb.aclose()

    run(main())


def test_oversized_header_aborts_the_connection() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        sb = await open_framed_connection(sock=b, codec=LengthPrefixed(max_frame_size=10))
        a.sendall(LengthPrefixed().encode(b"ok") + b"\x7f\xff\xff\xff")
        try:
            assert await sb.recv() == b"ok"
            with pytest.raises(FrameTooLarge, match="frame of 2147483647 bytes"):
                await sb.recv()
        finally:
            a.close()
            await sb.aclose()

    run(main())


def test_many_frames_with_flow_control() -> None:
    async def main() -> int:
        a, b = socket.socketpair()
        sa = await open_framed_connection(sock=a)
        sb = await open_framed_connection(sock=b, max_pending=16)
        payloads = [i.to_bytes(4, "big") for i in range(50_000)]

        async def produce() -> None:
            for i in range(0, len(payloads), 1000):
                await sa.send_many(payloads[i : i + 1000])
            await sa.shutdown_write()

        task = asyncio.create_task(produce())
        got = [f async for f in sb]
        await task
        await sa.aclose()
        await sb.aclose()
        assert got == payloads
        return len(got)

    assert run(main()) == 50_000


def test_use_after_close() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        sa = await open_framed_connection(sock=a)
        await sa.aclose()
        b.close()
        with pytest.raises(ClosedResourceError):
            await sa.send(b"x")
        with pytest.raises(ClosedResourceError):
            await sa.recv()

    run(main())
