"""TLS for the broker's connections, in memory, with half-close.

# Strategy:
# asyncio's own TLS transport closes the connection as soon as the peer has sent all it
# will send (its ``eof_received() -> True`` "has no effect when using ssl"), so replies
# the broker still owes - a confirmation waiting for the store, a parked GET - were lost
# over TLS although docs/protocol.md promises them (plain TCP keeps that promise). Here
# TLS runs over a plain TCP transport through ``ssl.MemoryBIO`` (trio's and h11's way:
# the protocol never touches the socket): bytes in are decrypted and handed to the
# broker's ``Connection`` as if they came from TCP, its replies are encrypted on the way
# out, and the peer's end of data (its ``close_notify``, or a bare FIN) is passed on as
# ``eof_received`` while the write side stays open. The broker's own half-close sends
# ``close_notify`` and then the FIN. The certificate and the handshake are the ``ssl``
# module's; the handshake must finish within ``handshake_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

__all__ = ["TLSProtocol"]

log = logging.getLogger("pigeon.server")

_READ = 64 * 1024  # plaintext bytes taken from TLS at a time


class _Transport(asyncio.Transport):
    """What the broker's connection sees: a transport that encrypts what it writes."""

    def __init__(self, tls: TLSProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.send(data)

    def writelines(self, list_of_data: Any) -> None:
        self._tls.send(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._tls.send_eof()

    def is_closing(self) -> bool:
        return self._tls.tcp is None or self._tls.tcp.is_closing()

    def close(self) -> None:
        if self._tls.tcp is not None:
            self._tls.tcp.close()

    def abort(self) -> None:
        if self._tls.tcp is not None:
            self._tls.tcp.abort()

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def is_reading(self) -> bool:
        return not self._tls.paused

    def get_write_buffer_size(self) -> int:
        tcp = self._tls.tcp
        return (tcp.get_write_buffer_size() if tcp is not None else 0) + self._tls.out.pending

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tls.tcp is not None:
            self._tls.tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._tls.tcp is not None
        return self._tls.tcp.get_write_buffer_limits()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls.tls
        if name == "peercert":
            return self._tls.tls.getpeercert()
        if name == "cipher":
            return self._tls.tls.cipher()
        tcp = self._tls.tcp
        return tcp.get_extra_info(name, default) if tcp is not None else default


class TLSProtocol(asyncio.Protocol):
    """Server-side TLS around ``app`` (an ``asyncio.BufferedProtocol``), which sees its
    ``connection_made`` once the handshake is done (never, if it fails or times out)."""

    def __init__(self, context: ssl.SSLContext, app: asyncio.BufferedProtocol,
                 handshake_timeout: float) -> None:  # fmt: skip
        self.app = app
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.inc, self.out, server_side=True)
        self.tcp: asyncio.Transport | None = None
        self.handshake_timeout = handshake_timeout
        self.shaken = False
        self.paused = False
        self.peer_done = False  # the peer sent all it will (close_notify or FIN)
        self.told_eof = False
        self.sent_eof = False
        self.ended = False  # abort() came: the connection is ended as soon as it is made
        self._timer: asyncio.TimerHandle | None = None
        self._transport = _Transport(self)

    # --- the TCP side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = transport  # type: ignore[assignment]
        if self.ended:
            self._abort()
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.handshake_timeout, self._handshake_expired
        )

    def data_received(self, data: bytes) -> None:
        self.inc.write(data)
        if not self.shaken:
            self._handshake()
            if not self.shaken:
                return
        self._deliver()

    def eof_received(self) -> bool:
        self.peer_done = True  # no close_notify needed: a FIN ends the peer's data as well
        if self.shaken:
            self._deliver()
        else:
            self._abort()
        return True  # our side stays open for the replies still owed

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.tcp = None
        if self.shaken:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.shaken:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.shaken:
            self.app.resume_writing()

    # --- the handshake ---------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", self._peer(), exc)
            self._flush()
            self._abort()
            return
        self._flush()
        self._cancel_timer()
        self.shaken = True
        self.app.connection_made(self._transport)

    def _handshake_expired(self) -> None:
        self._timer = None
        if not self.shaken:
            log.info("TLS handshake with %s not completed in time", self._peer())
            self._abort()

    # --- plaintext to the broker's connection ----------------------------------------------

    def _deliver(self) -> None:
        """Hand the broker what can be decrypted, unless it paused reading."""
        while not self.paused and self.tcp is not None:
            try:
                chunk = self.tls.read(_READ)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still on its way
            except ssl.SSLZeroReturnError:  # close_notify: the peer sends nothing more
                self.peer_done = True
                break
            except (ssl.SSLError, OSError) as exc:
                log.info("TLS error from %s: %s", self._peer(), exc)
                self._abort()
                return
            if not chunk:
                break
            self._feed(chunk)
        self._flush()  # what reading made TLS send (a key update)
        if self.peer_done and not self.paused and not self.told_eof and self.tcp is not None:
            self.told_eof = True
            self.app.eof_received()

    def _feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            buf = memoryview(self.app.get_buffer(len(view)))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.app.buffer_updated(n)
            view = view[n:]

    def pause_reading(self) -> None:
        self.paused = True
        if self.tcp is not None and not self.tcp.is_closing():
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.tcp is not None and not self.tcp.is_closing():
            with contextlib.suppress(RuntimeError):
                self.tcp.resume_reading()
            asyncio.get_running_loop().call_soon(self._deliver)  # what was left decrypted

    # --- the broker's replies --------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.tcp is None or self.tcp.is_closing() or self.sent_eof:
            return
        try:
            self.tls.write(data)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS error writing to %s: %s", self._peer(), exc)
            self._abort()
            return
        self._flush()

    def send_eof(self) -> None:
        """Our half-close: ``close_notify``, then the FIN."""
        if self.tcp is None or self.tcp.is_closing() or self.sent_eof:
            return
        self.sent_eof = True
        with contextlib.suppress(ssl.SSLError, OSError):
            self.tls.unwrap()  # writes close_notify; it wants the peer's, which may not come
        self._flush()
        if self.tcp.can_write_eof():
            with contextlib.suppress(OSError):
                self.tcp.write_eof()

    def _flush(self) -> None:
        data = self.out.read()
        if data and self.tcp is not None and not self.tcp.is_closing():
            self.tcp.write(data)

    # --- helpers ---------------------------------------------------------------------------

    def abort(self) -> None:
        """End the connection now, or as soon as it is made (the broker stops while its
        handshake runs: it has asked nothing, it is owed nothing)."""
        self.ended = True
        self._abort()

    def _abort(self) -> None:
        self._cancel_timer()
        if self.tcp is not None:
            self.tcp.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _peer(self) -> str:
        peer = self.tcp.get_extra_info("peername") if self.tcp is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "-")
