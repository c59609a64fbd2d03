"""W3C trace context across the queue, with the optional ``pigeon[otel]`` extra.

``put`` adds ``traceparent``/``tracestate`` from the current span to the message's
headers, in the room the caller's own headers leave (``pigeon.options``);
``pigeon.consume`` and ``pigeon worker`` run each handler inside a consumer span, a child
of the producer's, with the messaging semantic-convention attributes. Without
opentelemetry-api installed, the first put tries the import once and every later call is
one global read.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

_api: Any = None  # None: not looked for yet; False: not installed; else (trace, propagate)


def _load() -> Any:
    global _api
    if _api is None:
        try:
            from opentelemetry import (  # type: ignore[import-not-found,unused-ignore]
                context,
                propagate,
                trace,
            )
        except ImportError:
            _api = False
        else:
            _api = (trace, propagate, context.get_current)
    return _api


def tracing() -> bool:
    """True if a span is current (so a put has a trace context to carry)."""
    api = _api if _api is not None else _load()
    if not api or not api[2]():  # no context at all: no span (the common case, ~50 ns)
        return False
    return bool(api[0].get_current_span().get_span_context().is_valid)


def trace_context() -> dict[str, str]:
    """The current span's W3C trace context as headers (``traceparent``, ``tracestate``)."""
    out: dict[str, str] = {}
    _load()[1].inject(out)
    return out


def tracer_for(url: str | None) -> Callable[[Any], contextlib.AbstractContextManager[Any]]:
    """For ``consume``: what wraps each handler call of the queue at ``url`` - a consumer
    span when opentelemetry is installed, else a context manager that does nothing."""
    if not _load():
        return _untraced
    parts = urlsplit(url) if url else None
    system = parts.scheme.split("+")[0] if parts else "pigeon-local"
    queue = parts.path.strip("/") if parts else "local"
    return functools.partial(consumer_span, system, queue)


def _untraced(msg: Any) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


@contextlib.contextmanager
def consumer_span(system: str, queue: str, msg: Any) -> Iterator[None]:
    """Run a handler inside a consumer span, a child of the context ``msg`` carries."""
    api = _api if _api is not None else _load()
    if not api:
        yield
        return
    trace, propagate, _ = api
    headers = getattr(msg, "headers", None) or {}
    parent = propagate.extract(headers) if headers else None
    tracer = trace.get_tracer("pigeon")
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.destination.name": queue,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
    }
    message_id = getattr(msg, "id", None)
    if message_id is not None:
        attributes["messaging.message.id"] = str(message_id)
    count = getattr(msg, "delivery_count", None)
    if count is not None:
        attributes["messaging.message.delivery_count"] = int(count)
    with tracer.start_as_current_span(
        f"process {queue}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ):
        yield
