"""r8c: the public framing codec ``pigeon.framing.LengthPrefixed`` - the default codec of
``pigeon.streams`` (FramedSocket, the asyncio streams), a client-side API - is one of the
compiled modules. Compiled, it refuses every payload that is not bytes, bytearray or
memoryview with ``TypeError: union[bytes, bytearray] object expected``: an
``array.array``, an ``mmap``, a NumPy array - any buffer - that the Python source (the
reference, and what 3.12 CI runs) frames fine. ``FramedSocket.send(mmap)`` breaks on a
compiled install only. ``Delimited`` and ``FixedLength``, not compiled, take them too.

Exit 1 while the compiled build refuses a buffer that PIGEON_PURE_PYTHON=1 frames (or the
compiled modules are not in use: exit 2).
Run: PYTHONPATH=src python review/round8/r8c_framing_buffers.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r8c_common import child, compiled_here

CODE = r"""
import array, json, mmap, socket
from pigeon.framing import LengthPrefixed
from pigeon.streams.sync import FramedSocket

def buffers():
    m = mmap.mmap(-1, 5); m.write(b"hello")
    return {"array.array": array.array("B", b"hello"), "mmap": m}

out = {}
for name, p in buffers().items():
    for how in ("encode", "encode_parts", "encode_many", "FramedSocket.send"):
        try:
            if how == "FramedSocket.send":
                a, b = socket.socketpair()
                with FramedSocket(a) as fa, FramedSocket(b) as fb:
                    fa.send(p)
                    got = fb.recv()
            elif how == "encode_many":
                got = LengthPrefixed().decoder().feed(LengthPrefixed().encode_many([p]))[0]
            elif how == "encode_parts":
                got = b"".join(bytes(x) for x in LengthPrefixed().encode_parts(p))[4:]
            else:
                got = LengthPrefixed().decoder().feed(LengthPrefixed().encode(p))[0]
            out[f"{name} {how}"] = "ok" if got == b"hello" else f"wrong: {got!r}"
        except Exception as exc:
            out[f"{name} {how}"] = f"{type(exc).__name__}: {exc}"
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
    differ = 0
    for case, want in pure.items():
        got = compiled[case]
        mark = "  " if got == want else "!!"
        differ += got != want
        print(f"{mark} {case:28} pure: {want:10} compiled: {got}")
    if differ:
        print(f"DEFECT: {differ} of {len(pure)} framings of a buffer that the Python source "
              "takes fail only in the compiled build (LengthPrefixed is public API)")  # fmt: skip
        return 1
    print("held: the compiled codec frames what the source frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
