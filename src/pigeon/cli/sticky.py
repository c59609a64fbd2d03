"""The sticky-packet demo: raw TCP, then the three codecs, then a half-close."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from pigeon.framing import Codec, Delimited, FixedLength, LengthPrefixed
from pigeon.streams import FramedSocket

console = Console(highlight=False)


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server), Nagle left on for the raw part."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _raw(messages: list[bytes]) -> None:
    console.rule("[bold](a) raw TCP: the byte stream has no message boundaries")
    client, server = _pair()
    chunks: list[bytes] = []
    with client, server:

        def send_all() -> None:
            for m in messages:
                client.sendall(m)
            client.sendall(b"B" * 1_000_000)
            client.shutdown(socket.SHUT_WR)

        t = _in_thread(send_all)
        time.sleep(0.05)  # let the small sends pile up in the receive buffer
        while chunk := server.recv(16384):
            chunks.append(chunk)
        t.join()
    small = sum(map(len, messages))
    merged = [c for c in chunks if not c.startswith(b"B")]
    console.print(
        f"{len(messages)} small send() calls ({small} bytes) and one send() of 1,000,000 bytes"
    )
    console.print(f"arrived as [bold]{len(chunks)}[/] recv() results, of these sizes:")
    sizes = [len(c) for c in chunks]
    console.print("  " + ", ".join(map(str, sizes[:12])) + (" ..." if len(sizes) > 12 else ""))
    if len(merged) >= 2:
        first, second = merged[0], merged[1]
        console.print(
            f"the first recv() held {first.count(b'msg-')} messages glued together "
            f"(merged):\n  {first[:60]!r}..."
        )
        console.print(
            f"and a message was cut between two recv() calls (split):\n"
            f"  ...{first[-24:]!r} | {second[:24]!r}..."
        )
    console.print(
        "and the 1,000,000-byte message was split across "
        f"{sum(1 for c in chunks if b'B' in c)} recv() calls.\n"
        "A reader that treats one recv() as one message is wrong in both directions."
    )


def _framed(messages: list[bytes]) -> None:
    console.rule("[bold](b) framing restores the boundaries")
    width = max(map(len, messages))
    codecs: list[tuple[str, Codec, list[bytes]]] = [
        ("FixedLength", FixedLength(width), [m.ljust(width, b".") for m in messages]),
        ("Delimited", Delimited(b"\r\n"), messages),
        ("LengthPrefixed", LengthPrefixed(header_size=4), messages),
    ]
    table = Table("codec", "sent", "wire bytes", "recv() calls", "frames back", "identical")
    rng = random.Random(7)
    for name, codec, payloads in codecs:
        wire = codec.encode_many(payloads)
        client, server = _pair()
        with client, FramedSocket(server, codec) as framed:

            def send_in_random_pieces(wire: bytes = wire, client: socket.socket = client) -> None:
                pos = 0
                while pos < len(wire):
                    step = rng.randint(1, 300)
                    client.sendall(wire[pos : pos + step])
                    pos += step
                client.shutdown(socket.SHUT_WR)

            t = _in_thread(send_in_random_pieces)
            got = list(framed)
            t.join()
            calls = framed.recv_calls
        ok = "[green]yes[/]" if got == payloads else "[red]NO[/]"
        table.add_row(name, str(len(payloads)), str(len(wire)), str(calls), str(len(got)), ok)
    console.print(table)
    console.print(
        "FixedLength: every record the same size (here padded by the sender).\n"
        "Delimited: a \\r\\n after each message; the payload must not contain it.\n"
        "LengthPrefixed: a 4-byte big-endian length, then the bytes; works for anything."
    )


def _half_close(messages: list[bytes]) -> None:
    console.rule("[bold](c) half-close: done sending, still listening")
    client_sock, server_sock = _pair()
    answer: list[bytes] = []
    with FramedSocket(client_sock) as client, FramedSocket(server_sock) as server:

        def serve() -> None:
            count = total = 0
            for frame in server:  # until the client's FIN
                count += 1
                total += len(frame)
            # The client can no longer send, but it still reads: answer now.
            server.send(f"received {count} messages, {total} bytes".encode())
            server.close()

        t = _in_thread(serve)
        client.send_many(messages)
        client.shutdown_write()  # FIN: "I am done sending"
        console.print(f"client sent {len(messages)} messages, then shutdown(SHUT_WR)")
        while (frame := client.recv()) is not None:
            answer.append(frame)
        t.join()
    console.print(f"server answered after the client's FIN: [bold]{answer[0].decode()}[/]")
    console.print("client read the answer, then a clean EOF: nothing in flight was lost.")
    console.print(
        "\nFour-way teardown: each side sends its own FIN and the other ACKs it, so each "
        "direction closes on its own;\nthe side that closes first waits in TIME_WAIT "
        "(2×MSL) so stray segments die; servers set SO_REUSEADDR to rebind at once."
    )


def run(count: int) -> None:
    """Run all three parts with ``count`` small messages."""
    messages = [f"msg-{i:05d}:{'x' * (i % 17)}".encode() for i in range(count)]
    _raw(messages)
    _framed(messages)
    _half_close(messages)
