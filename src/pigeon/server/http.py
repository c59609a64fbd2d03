"""``pigeon serve --http HOST:PORT``: metrics, health checks, the STATS document and a live
dashboard, from the broker's own event loop.

# Strategy:
# HTTP/1.1 is spoken by h11 (sans-IO, as pigeon's own protocol is): this module only moves
# bytes between asyncio streams and an ``h11.Connection``. Everything is read from the
# broker's state when asked for - Prometheus metrics are built at scrape time by a
# collector, the dashboard polls ``/api/stats`` - so the message path pays nothing for
# being watched; only a sampler adds the broker-wide put/delivered/acked counts of each
# two seconds to a ring (a few numbers a sample, however many queues), for the dashboard's
# chart of the last ten minutes. Whoever can reach the port gets a bounded share: at most
# ``max_connections`` at once (more are closed at once), a request head must arrive whole
# within ``request_timeout`` (checked before anything else; the token before any body),
# and a reply that the client does not read within ``write_timeout`` closes it. The
# dashboard and its chart library (uPlot, MIT) ship in the package: no CDN, no internet.
# The same rule as the broker's port: loopback by default; any other address needs the
# token (``Authorization: Bearer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Any

import h11
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pigeon._net import is_loopback
from pigeon.server.interfaces import Observed
from pigeon.server.listener import close_listener

__all__ = ["HttpSideDoor", "parse_address"]

log = logging.getLogger("pigeon.http")

HISTORY_EVERY = 2.0  # seconds between samples of the counters, for the chart
HISTORY_SAMPLES = 300  # ten minutes
MAX_CONNECTIONS = 64  # HTTP connections at once: a dashboard or a scraper needs one or two
REQUEST_TIMEOUT = 10.0  # seconds for a whole request head to arrive
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may wait for its next request
WRITE_TIMEOUT = 30.0  # seconds a client may take to read a reply
_STATIC = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/static/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/static/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8"),
}
_COUNTERS = ("put", "delivered", "acked", "redelivered", "dead")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a pair; ValueError if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, like 127.0.0.1:7879, not {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


class _Collector:
    """Prometheus metrics, read from the broker when scraped."""

    def __init__(self, server: Observed) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        broker = self.server.broker
        now = broker.now if not self.server.loop.is_running() else self.server.now()
        gauges = {
            "depth": GaugeMetricFamily(
                "pigeon_queue_depth", "Messages waiting to be delivered (ready or delayed).",
                labels=["queue"],
            ),
            "in_flight": GaugeMetricFamily(
                "pigeon_queue_in_flight", "Messages delivered and not yet settled.",
                labels=["queue"],
            ),
            "consumers": GaugeMetricFamily(
                "pigeon_queue_consumers_waiting", "GETs parked, waiting for a message.",
                labels=["queue"],
            ),
            "age": GaugeMetricFamily(
                "pigeon_queue_oldest_message_age_seconds",
                "Seconds the oldest waiting message has been in its queue.", labels=["queue"],
            ),
        }  # fmt: skip
        counters = {
            name: CounterMetricFamily(
                f"pigeon_messages_{name}", f"Messages {name} since the broker started.",
                labels=["queue"],
            )
            for name in _COUNTERS
        }  # fmt: skip
        for name, q in broker.queues.items():
            gauges["depth"].add_metric([name], q.depth)
            gauges["in_flight"].add_metric([name], len(q.in_flight))
            gauges["consumers"].add_metric([name], q.consumers_waiting)
            gauges["age"].add_metric([name], q.oldest_age(now))
            for c in _COUNTERS:
                counters[c].add_metric([name], getattr(q, f"{c}_total"))
        yield from gauges.values()
        yield from counters.values()
        conns = GaugeMetricFamily("pigeon_connections", "Client connections open now.")
        conns.add_metric([], len(self.server.connections))
        yield conns
        disk = getattr(self.server.broker.store, "disk_bytes", None)
        if disk is not None:
            d = GaugeMetricFamily(
                "pigeon_store_disk_bytes", "Bytes the store takes on disk now (log segments, "
                "or the SQLite database and its WAL)."
            )  # fmt: skip
            d.add_metric([], disk)
            yield d
        commits = self.server.broker.store.commit_histogram()
        if commits is not None:
            buckets, total = commits
            h = HistogramMetricFamily(
                "pigeon_store_commit_seconds", "Time each store commit took (group commit)."
            )
            h.add_metric(
                [], [("+Inf" if le == float("inf") else str(le), n) for le, n in buckets], total
            )
            yield h


class HttpSideDoor:
    """The HTTP listener of one broker."""

    def __init__(self, server: Observed, host: str, port: int, token: str | None) -> None:
        if not is_loopback(host) and not token:
            raise PermissionError(
                f"refusing to serve HTTP on {host}, which is not a loopback address, without "
                "a token: pass --token (requests then need 'Authorization: Bearer TOKEN')"
            )
        self.server = server
        self.host = host
        self.port = port
        self.token = token if not is_loopback(host) else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(server))
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_SAMPLES)
        self._last: dict[str, tuple[int, int, int]] = {}  # per queue, at the last sample
        self._last_t = time.time()
        self.connections = 0
        self.max_connections = MAX_CONNECTIONS
        self._server: asyncio.Server | None = None
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        log.info("HTTP on http://%s:%d (dashboard at /, metrics at /metrics)", self.host, self.port)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._server is not None:
            await close_listener(self._server)
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # --- what it answers --------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self.server.stopping:
            return False, "the broker is stopping"
        stalled = self.server.broker.store.stalled_for
        if stalled > 1.0:
            return False, f"the store has not been able to commit for {min(stalled, 1e9):.0f} s"
        return True, "ok"

    def _sample_now(self) -> dict[str, Any]:
        """What happened since the last sample, summed over the queues: a few numbers,
        however many queues (the previous counts are kept once, not per sample)."""
        last, now = self._last, {}
        put = delivered = acked = 0
        for name, q in self.server.broker.queues.items():
            counts = now[name] = (q.put_total, q.delivered_total, q.acked_total)
            p, d, a = last.get(name, (0, 0, 0))
            put += max(0, counts[0] - p)
            delivered += max(0, counts[1] - d)
            acked += max(0, counts[2] - a)
        t = time.time()
        sample = {"t": round(t, 3), "dt": round(max(1e-3, t - self._last_t), 3),
                  "put": put, "delivered": delivered, "acked": acked}  # fmt: skip
        self._last, self._last_t = now, t
        return sample

    async def _sample(self) -> None:
        self._sample_now()  # the starting counts
        while True:
            await asyncio.sleep(HISTORY_EVERY)
            self.history.append(self._sample_now())

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}'
        if path == "/readyz":
            ok, reason = self.ready()
            body = json.dumps({"ready": ok, "reason": reason}).encode()
            return (200 if ok else 503), "application/json", body
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/api/stats":
            return 200, "application/json", json.dumps(self.server.stats()).encode()
        if path == "/api/history":
            body = json.dumps({"every": HISTORY_EVERY, "samples": list(self.history)}).encode()
            return 200, "application/json", body
        if path in _STATIC:
            name, kind = _STATIC[path]
            return 200, kind, resources.files("pigeon.server").joinpath("static", name).read_bytes()
        return 404, "text/plain", f"nothing at {path}; try / or /metrics\n".encode()

    def _authorized(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        if not self.token:
            return True
        for name, value in headers:
            if name.lower() == b"authorization" and value.startswith(b"Bearer "):
                return hmac.compare_digest(value[7:].strip(), self.token.encode())
        return False

    # --- bytes <-> h11 ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            log.warning("HTTP: %d connections already open (the limit): closed a new one from %s",
                        self.connections, writer.get_extra_info("peername"))  # fmt: skip
            writer.transport.abort()
            return
        self.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        loop = asyncio.get_running_loop()
        try:
            # the first request's head within REQUEST_TIMEOUT; a later one within the idle
            # time plus REQUEST_TIMEOUT; never a timeout per read (a byte a minute is slow)
            deadline = loop.time() + REQUEST_TIMEOUT
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout_at(deadline):
                        data = await reader.read(16 * 1024)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    allowed = await self._answer(conn, writer, event)
                    if not allowed or conn.our_state is h11.MUST_CLOSE:
                        break  # a refused client sends no body we would read
                    deadline = loop.time() + IDLE_TIMEOUT + REQUEST_TIMEOUT
                    with contextlib.suppress(h11.LocalProtocolError):
                        while conn.next_event() not in (h11.NEED_DATA, h11.PAUSED):
                            pass  # skip a request body: nothing here reads one
                    conn.start_next_cycle()
                    continue
                break  # ConnectionClosed, or a state we do not serve
        except (h11.RemoteProtocolError, TimeoutError, OSError, h11.LocalProtocolError):
            pass
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request
    ) -> bool:
        """Answer ``req``; False if it was refused (the connection then closes)."""
        allowed = self._authorized(req.headers)
        if not allowed:
            status, kind, body = 401, "text/plain", b"send Authorization: Bearer TOKEN\n"
        else:
            try:
                status, kind, body = self.respond(req.method.decode(), req.target.decode())
            except Exception:  # a bug must not take the broker down: say so, log it
                log.exception("HTTP %s failed", req.target)
                status, kind, body = 500, "text/plain", b"internal error; see the broker's log\n"
        headers = [
            ("content-type", kind),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
        ]
        if status == 401:
            headers.append(("www-authenticate", 'Bearer realm="pigeon"'))
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        if req.method != b"HEAD":
            writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        return allowed
