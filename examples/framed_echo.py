"""A framed echo server and client over loopback TCP, with a graceful half-close.

Run:  python examples/framed_echo.py
"""

from __future__ import annotations

import socket
import threading

from pigeon.framing import LengthPrefixed
from pigeon.streams import FramedSocket


def serve(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with FramedSocket(conn, LengthPrefixed()) as stream:
        for frame in stream:  # until the client half-closes
            stream.send(frame.upper())
        stream.shutdown_write()


def main() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=serve, args=(listener,))
        server.start()
        sock = socket.create_connection(listener.getsockname())
        with FramedSocket(sock, LengthPrefixed()) as stream:
            stream.send_many([b"java", b"Python", b"JavaScript"])
            stream.shutdown_write()  # done sending; the replies still arrive
            print([frame.decode() for frame in stream])
        server.join()


if __name__ == "__main__":
    main()
