"""TLS contexts for pigeon+tls:// clients."""

from __future__ import annotations

import ssl
from typing import Any


def client_context(ep: Any) -> ssl.SSLContext:
    """Verify the broker's certificate (``?cafile=PATH`` for a private CA).

    ``?insecure=1`` turns verification off: for tests with a throwaway certificate only.
    """
    ctx = ssl.create_default_context(cafile=ep.params.get("cafile"))
    if ep.flag("insecure"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
