"""r8c: a broker configured from Python with a count written as a float (``64e6``,
``1e4``, ``20.0``) serves on the source and kills every connection once compiled. The
limits of ``ServerConfig``/``Limits`` are plain dataclass fields, not checked nor
coerced; the compiled modules read them as ``int`` and raise ``TypeError: int object
expected; got float`` inside ``buffer_updated`` (``Connection._check_output`` at the
WELCOME for ``max_pending_output``), which asyncio/uvloop turn into "Fatal error:
protocol.buffer_updated() call failed" and a closed connection - for every client, while
the broker keeps accepting. ``pigeon.testing.BrokerThread(**config)`` and
``BrokerServer(ServerConfig(...))`` are the Python ways to run a broker; the CLI is safe
(click converts). Seen: 6 of 7 such settings work pure and break compiled
(max_pending_output, max_unacked_bytes, max_queues, max_connections, max_deliveries,
max_unauthenticated; ``port=0.0`` too).

Exit 1 while a setting that serves a put and a get on the source breaks them compiled
(exit 2 when the compiled modules are not in use).
Run: PYTHONPATH=src python review/round8/r8c_config_numbers.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r8c_common import child, compiled_here

CODE = r"""
import json, logging
logging.disable(logging.CRITICAL)
import pigeon
from pigeon.testing.broker import BrokerThread
out = {}
for k, v in {"max_pending_output": 64e6, "max_unacked_bytes": 64e6, "max_queues": 1e4,
             "max_connections": 1e4, "max_deliveries": 20.0, "max_unauthenticated": 64.0,
             "max_parked_bytes": 256e6}.items():
    try:
        with BrokerThread(**{k: v}) as b:
            with pigeon.Queue(b.url("r8c"), serializer="raw", reconnect_timeout=0) as q:
                q.put(b"x")
                out[k] = "ok" if q.get(timeout=5) == b"x" else "wrong item"
    except Exception as exc:
        out[k] = f"{type(exc).__name__}: {str(exc)[:90]}"
print(json.dumps(out))
"""


def main() -> int:
    try:
        if not compiled_here():
            print("the compiled modules are not in use here (build them): cannot compare")
            return 2
        compiled = child(CODE, pure=False, timeout=300)
        pure = child(CODE, pure=True, timeout=300)
    except Exception as exc:
        print(f"cannot set up: {exc}")
        return 2
    broken = [k for k in pure if pure[k] == "ok" and compiled[k] != "ok"]
    for k in pure:
        print(f"{'!!' if k in broken else '  '} {k}: pure {pure[k]} | compiled {compiled[k]}")
    if broken:
        print(f"DEFECT: {len(broken)} settings given as floats serve on the source, and "
              "compiled every connection is closed by a TypeError")  # fmt: skip
        return 1
    print("held: the compiled broker takes what the source takes (or both refuse it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
