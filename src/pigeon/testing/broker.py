"""A pigeon broker in a background thread, for tests and examples.

with BrokerThread() as broker:
    q = pigeon.Queue(broker.url("jobs"))
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any

from pigeon.server.app import BrokerServer, ServerConfig

__all__ = ["BrokerThread"]


class BrokerThread:
    """Runs ``BrokerServer`` on its own event loop in a daemon thread (port 0: any free)."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("port", 0)
        self.config = ServerConfig(**config)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pigeon-broker", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.server: BrokerServer | None = None
        self.port = 0

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self.server = BrokerServer(self.config)
                await self.server.start()
                self.port = self.server.port
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.stop(grace=2.0)

        asyncio.run(main())

    def start(self) -> BrokerThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    @property
    def http_url(self) -> str:
        """The HTTP side door's address (with ``http="127.0.0.1:0"``)."""
        assert self.server is not None and self.server.http is not None
        return str(self.server.http.url)

    def url(self, queue: str, **params: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        token = f":{self.config.token}@" if self.config.token else ""
        return f"pigeon://{token}127.0.0.1:{self.port}/{queue}" + (f"?{query}" if query else "")

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
