"""A TCP proxy for tests that can drop what the broker sends: the lost-reply case."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable

from pigeon.framing import LengthPrefixed
from pigeon.protocol import ClientCodec, Deliver, Ok


def is_deliver(body: bytes) -> bool:
    try:
        return isinstance(ClientCodec().decode(body), Deliver)
    except Exception:
        return False


def settle_ok(body: bytes) -> bool:
    """The broker's OK to an ACK, NACK or EXTEND (``settled``/``unknown``), not the
    DECLARE's or a PUT's."""
    try:
        msg = ClientCodec().decode(body)
    except Exception:
        return False
    return isinstance(msg, Ok) and isinstance(msg.value, dict) and "settled" in msg.value


class CuttingProxy:
    """Forwards 127.0.0.1:port <-> the broker; the first time ``cut(frame)`` is true for a
    frame from the broker, that connection is closed on both sides instead (the frame is
    never forwarded). Later connections are forwarded untouched."""

    def __init__(self, target_port: int, cut: Callable[[bytes], bool] = is_deliver) -> None:
        self.target = ("127.0.0.1", target_port)
        self.cut = cut
        self.cuts = 0
        self._armed = True
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.port = self.ls.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.ls.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        dec = LengthPrefixed(max_frame_size=2**31).decoder()
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("closed")
                    if s is client:
                        upstream.sendall(data)
                        continue
                    frames = dec.feed(data)
                    if self._armed and any(self.cut(f) for f in frames):
                        self._armed = False
                        self.cuts += 1
                        raise OSError("cut")
                    client.sendall(data)
        except (OSError, ValueError):
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed = True
        self.ls.close()
