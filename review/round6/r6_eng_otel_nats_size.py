"""r6_eng_otel_nats_size: with the otel extra and a current span, put adds traceparent
to the headers; on nats:// the server counts headers with the payload against
max_payload. A put whose own headers fit must never fail (nor be half-stored) because of
the trace context. Found: an item stored in chunks whose headers leave just room for its
manifest under max_payload was refused with TooLarge once traceparent was added; now it
goes untraced instead. Starts a nats-server of its own with max_payload 8192.
Exit 1 while the defect is there, 0 when fixed."""

import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import pigeon

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("r6")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
d = Path(tempfile.mkdtemp())
(d / "nats.conf").write_text(
    f'host: 127.0.0.1\nport: {port}\nmax_payload: 8192\njetstream {{ store_dir: "{d}" }}\n'
)
proc = subprocess.Popen(["nats-server", "-c", str(d / "nats.conf")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
failures = []
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    url = f"nats://127.0.0.1:{port}/r6otel-{uuid.uuid4().hex[:8]}"
    item = b"x" * 20_000  # over max_payload: stored in chunks, a manifest published
    with pigeon.Queue(url, serializer="raw") as q:
        for pad in range(3700, 4200, 10):
            headers = {"x-pad": "p" * pad}
            try:
                q.put(item, headers=headers)  # untraced
            except pigeon.TooLarge:
                continue  # too large anyway: not tracing's doing
            with tracer.start_as_current_span("produce"):
                try:
                    q.put(item, headers=headers)
                except pigeon.TooLarge as exc:
                    failures.append(pad)
                    print(f"FAIL pad {pad}: untraced put ok, traced put refused: {exc}")
        got = q.get_many(1000, timeout=2)
        print(f"{len(got)} items taken, all whole: {all(g == item for g in got)}")
        if not all(g == item for g in got):
            failures.append("half")
finally:
    proc.terminate()
    proc.wait(10)
print("ok" if not failures else f"{len(failures)} failures")
sys.exit(1 if failures else 0)
