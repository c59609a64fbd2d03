"""r6_eng_redis_dedup_zero: dedup_window=0 on redis:// means "no dedup" (every put
stored), as on pigeon:// - from the URL and from the keyword. Before the fix the put
failed ('invalid expire time in set': SET PX 0) and the keyword was refused (TypeError);
a window under 1 ms rounded down to 0 the same way.
Exit 1 while the defect is there, 0 when fixed. Needs Redis on 127.0.0.1:6379."""

import sys
import uuid

import pigeon

BASE = "redis://127.0.0.1:6379/r6dz-" + uuid.uuid4().hex[:8]
bad = []


def stored(url: str, **kw: object) -> object:
    try:
        with pigeon.Queue(url, **kw) as q:
            try:
                q.put("1", dedup_id="x")
                q.put("2", dedup_id="x")
                return q.qsize()
            finally:
                q.delete() if hasattr(q, "delete") else q.shutdown(immediate=True)
    except Exception as exc:  # noqa: BLE001 - the defect shows as an error
        return f"{type(exc).__name__}: {exc}"


for label, url, kw, want in [
    ("?dedup_window=0 stores both", BASE + "a?dedup_window=0", {}, 2),
    ("dedup_window=0 (keyword) stores both", BASE + "b", {"dedup_window": 0}, 2),
    ("?dedup_window=0.0004 (rounds up to 1 ms) works", BASE + "c?dedup_window=0.0004", {}, None),
    ("the default window dedups", BASE + "d", {}, 1),
]:
    got = stored(url, **kw)
    ok = got == want if want is not None else isinstance(got, int)
    print(("ok   " if ok else "FAIL ") + f"{label}: {got!r}")
    if not ok:
        bad.append(label)
sys.exit(1 if bad else 0)
