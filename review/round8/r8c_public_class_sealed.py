"""r8c: compiled, the public classes of the compiled modules cannot be subclassed, nor
(the dataclasses' native slots) be given attributes the source allows. ``_compiled.py``
says its modules hold "no class that an interpreted module subclasses" - true of pigeon
itself, not of its users: ``pigeon.framing.LengthPrefixed`` is public API (documented in
``pigeon.framing``, the default codec of ``pigeon.streams``), and ``class
MyCodec(LengthPrefixed)`` is accepted, then its first instance fails with ``TypeError:
interpreted classes cannot inherit from compiled`` on 3.11/3.13 (compiled); it works on
3.12 (pure, in CI). The same
holds for ``pigeon.server.app.BrokerServer`` and ``pigeon.server.connection.Connection``
(what an embedding application or a test wraps) and ``pigeon.server.core.Broker``.

Exit 1 while a class that the Python source lets an application subclass is sealed by the
compiled build (exit 2 when the compiled modules are not in use).
Run: PYTHONPATH=src python review/round8/r8c_public_class_sealed.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r8c_common import child, compiled_here

CODE = r"""
import importlib, json
out = {}
for path in ("pigeon.framing.LengthPrefixed", "pigeon.server.app.BrokerServer",
             "pigeon.server.connection.Connection", "pigeon.server.core.Broker",
             "pigeon.protocol.server.ServerConnection", "pigeon.server.commit_gate.CommitGate"):
    mod, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    mine = type("Mine", (cls,), {})
    try:
        mine() if cls.__name__ == "LengthPrefixed" else mine.__new__(mine)  # (no loop here)
        out[path] = "ok"
    except TypeError as exc:
        out[path] = f"TypeError: {exc}"
print(json.dumps(out))
"""


def main() -> int:
    try:
        if not compiled_here():
            print("the compiled modules are not in use here (build them): cannot compare")
            return 2
        compiled = child(CODE, pure=False)
        pure = child(CODE, pure=True)
    except Exception as exc:
        print(f"cannot set up: {exc}")
        return 2
    sealed = [c for c, v in compiled.items() if v != pure[c]]
    for cls in compiled:
        print(f"{'!!' if cls in sealed else '  '} class Mine({cls}): pure {pure[cls]}; "
              f"compiled {compiled[cls]}")  # fmt: skip
    if sealed:
        print(f"DEFECT: {len(sealed)} public classes can be subclassed from the source but "
              "not once compiled")  # fmt: skip
        return 1
    print("held: every class subclasses the same compiled and pure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
