"""r8c: a method patched on a compiled class is accepted - and ignored by the compiled
code that calls it. mypyc lets ``BrokerServer.refuse_writes = ...`` (or
``mock.patch.object``, ``monkeypatch.setattr``) replace the class attribute, so nothing
fails; but ``BrokerServer.request`` calls ``self.refuse_writes()`` natively (vtable), so
the patch is seen only by interpreted callers. A test that simulates a failing store that
way passes its setup and tests nothing on 3.11/3.13 (compiled), while it works on 3.12
(pure). Seen: with ``refuse_writes`` patched to refuse, a put is refused on the source
and stored compiled; ``LengthPrefixed._check`` patched to raise is ignored by
``encode``. (Dunder methods - ``Ready.__iter__``, which tests/server/core/test_admin.py
patches - go through type slots and are seen: that test holds.)

Exit 1 while a patch that changes what the source does is silently ignored compiled
(exit 2 when the compiled modules are not in use).
Run: PYTHONPATH=src python review/round8/r8c_patch_ignored.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r8c_common import child, compiled_here

CODE = r"""
import json, logging
from unittest import mock
logging.disable(logging.CRITICAL)
import pigeon
from pigeon.framing import LengthPrefixed
from pigeon.server.app import BrokerServer
from pigeon.testing.broker import BrokerThread
out = {}
with mock.patch.object(BrokerServer, "refuse_writes", lambda self: "simulated: disk failed"):
    with BrokerThread() as b, pigeon.Queue(b.url("r8c"), serializer="raw",
                                           reconnect_timeout=0) as q:
        try:
            q.put(b"x")
            out["BrokerServer.refuse_writes patched to refuse; put"] = "stored"
        except pigeon.PigeonError as exc:
            out["BrokerServer.refuse_writes patched to refuse; put"] = "refused"

def boom(self, size):
    raise ValueError("patched")

with mock.patch.object(LengthPrefixed, "_check", boom):
    try:
        LengthPrefixed().encode(b"x")
        out["LengthPrefixed._check patched to raise; encode"] = "encoded"
    except ValueError:
        out["LengthPrefixed._check patched to raise; encode"] = "raised"
print(json.dumps(out))
"""


def main() -> int:
    try:
        if not compiled_here():
            print("the compiled modules are not in use here (build them): cannot compare")
            return 2
        compiled = child(CODE, pure=False, timeout=120)
        pure = child(CODE, pure=True, timeout=120)
    except Exception as exc:
        print(f"cannot set up: {exc}")
        return 2
    ignored = [k for k in pure if compiled[k] != pure[k]]
    for k in pure:
        print(f"{'!!' if k in ignored else '  '} {k}: pure {pure[k]} | compiled {compiled[k]}")
    if ignored:
        print(f"DEFECT: {len(ignored)} patches accepted and ignored by the compiled code")
        return 1
    print("held: a patched method is seen (or refused) compiled as on the source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
