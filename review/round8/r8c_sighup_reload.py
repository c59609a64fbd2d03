"""r8c: on the compiled build, SIGHUP no longer reloads the token: token rotation is broken.
``pigeon serve --config FILE`` started without TLS, the token changed in FILE, then
SIGHUP: the broker logs "SIGHUP: reload failed; the old settings stay" with
``TypeError: tuple[str, str] or None object expected; got tuple[click._utils.Sentinel,
click._utils.Sentinel]`` (app.py ``reload``), and the old token keeps working while the
new one is refused. On the source the same call goes through.

Why: ``cli/serve.py`` ``hangup`` builds ``tls = (new["tls_cert"], new["tls_key"]) if
new["tls_cert"] and new["tls_key"] else None``. With neither option set, ``reloaded()``
hands back click's ``Sentinel.UNSET`` (truthy) for both (click 8.5.1 here). The source
``reload`` ignores that tuple because there is no SSL context, though it still logs
"reloaded the token and the TLS certificate", which is wrong. The compiled ``reload``
checks ``tls: tuple[str, str] | None`` and raises before it changes anything. The repo's
own tests/server/test_operate.py::test_json_logs_and_sighup_reload_the_token fails on the
compiled run (``make pytest``: 1 failed, 1563 passed here) and passes with
PIGEON_PURE_PYTHON=1.

Exit 1 while the compiled broker keeps the old token after a SIGHUP (exit 2 when it
cannot start or the compiled modules are not in use).
Run: PYTHONPATH=src python review/round8/r8c_sighup_reload.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _r8c_common import SRC, compiled_here

PORTS = {False: 7976, True: 7979}


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def rotate(pure: bool) -> tuple[str, str, str] | None:
    """(new token, old token, what the log says of the reload); None: no broker."""
    import pigeon

    port = PORTS[pure]
    env = {k: v for k, v in os.environ.items() if k != "PIGEON_PURE_PYTHON"}
    env["PYTHONPATH"] = str(SRC)
    if pure:
        env["PIGEON_PURE_PYTHON"] = "1"
    with tempfile.TemporaryDirectory(prefix="rvc-hup-") as tmp:
        config = Path(tmp, "pigeon.toml")
        config.write_text('token = "first"\n')
        logf = Path(tmp, "broker.log")
        with open(logf, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pigeon", "serve", "--memory", "--port", str(port),
                 "--config", str(config)],
                stdout=out, stderr=out, env=env,
            )  # fmt: skip
        try:
            if not wait_port(port, proc):
                print(logf.read_text())
                return None
            config.write_text('token = "second"\n')
            proc.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            seen = []
            for token in ("second", "first"):
                url = f"pigeon://:{token}@127.0.0.1:{port}/r8c"
                try:
                    with pigeon.Queue(url, reconnect_timeout=0) as q:
                        q.put(1)
                    seen.append("accepted")
                except pigeon.AuthError:
                    seen.append("refused")
        finally:
            proc.terminate()
            proc.wait(20)
        said = [ln for ln in logf.read_text().splitlines() if "reload" in ln or "TypeError" in ln]
    return seen[0], seen[1], " / ".join(s.split(": ", 1)[-1][:140] for s in said)


def main() -> int:
    try:
        if not compiled_here():
            print("the compiled modules are not in use here (build them): cannot compare")
            return 2
    except Exception as exc:
        print(f"cannot set up: {exc}")
        return 2
    results = {}
    for pure in (True, False):
        got = rotate(pure)
        if got is None:
            print("the broker did not start")
            return 2
        results[pure] = got
        what = "pure" if pure else "compiled"
        print(
            f"{what}: after SIGHUP the new token is {got[0]}, the old one {got[1]}; log: {got[2]}"
        )
    if results[False][:2] != ("accepted", "refused"):
        print("DEFECT: the compiled broker keeps the old token after SIGHUP (reload raises)")
        return 1
    print("held: SIGHUP rotates the token on the compiled build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
