"""Log store, --fsync batch with the C syncer (the default `pigeon serve`): a failed
fdatasync of the C thread is not seen by the broker until the next write reaches the
store. Meanwhile /readyz says ready and ``stalled_for`` is 0, and the next put is
taken, written, and held for --store-timeout (5 s) before it is answered 'unavailable',
where the Python syncer (PIGEON_PURE_PYTHON=1, the reference) breaks the store at once:
/readyz 503 and the put refused at once.

Why: Durable.stalled_for (asked by app.refuse_writes before every put and by
http.ready) reads only ``self._error``. The C thread keeps its errno in the Syncer
struct; ``_native_failed()`` copies it into ``_error`` only from ``_flush``,
``unwritten()`` and ``_fsync_or_break``, never from ``stalled_for``.

The disk failure is an LD_PRELOAD shim (built here with gcc) that makes fdatasync fail
with EIO once a flag file exists - what a failed writeback looks like to the broker.

Run: PYTHONPATH=src python r7_native_fsync_unseen.py   (exit 1: the defect is present)
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
int fdatasync(int fd) {
    const char *flag = getenv("R7_FAIL_FLAG");
    if (flag && access(flag, F_OK) == 0) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
"""
PORT, HTTP = 7942, 7943


def text(sock, line):
    sock.sendall(line.encode() + b"\n")
    t0 = time.monotonic()
    data = b""
    while not data.endswith(b"\r\n"):
        data += sock.recv(4096)
    return data.decode().strip(), time.monotonic() - t0


def ready():
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/readyz", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def run(tmp, pure):
    data, flag = os.path.join(tmp, "data" + pure), os.path.join(tmp, "fail")
    if os.path.exists(flag):
        os.unlink(flag)
    env = dict(os.environ, LD_PRELOAD=os.path.join(tmp, "shim.so"), R7_FAIL_FLAG=flag)
    if pure:
        env["PIGEON_PURE_PYTHON"] = "1"
    else:
        env.pop("PIGEON_PURE_PYTHON", None)
    p = subprocess.Popen([sys.executable, "-m", "pigeon", "serve", "--port", str(PORT),
                          "--http", f"127.0.0.1:{HTTP}", "--data-dir", data],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", PORT), timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        s.settimeout(10)
        text(s, "PUT r7-q one")
        open(flag, "w").close()  # the disk fails from now on
        text(s, "PUT r7-q two")  # written; the syncer's fdatasync 10 ms later fails
        time.sleep(1.5)
        status = ready()
        reply, took = text(s, "PUT r7-q three")
        s.close()
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    return status, reply, took


def main():
    tmp = tempfile.mkdtemp(prefix="r7-native-")
    try:
        with open(os.path.join(tmp, "shim.c"), "w") as f:
            f.write(SHIM)
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", os.path.join(tmp, "shim.so"),
                        os.path.join(tmp, "shim.c"), "-ldl"], check=True)
        ref = run(tmp, "1")
        got = run(tmp, "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Python syncer: /readyz {ref[0]}; next put -> {ref[1]!r} in {ref[2]:.2f} s")
    print(f"C syncer:      /readyz {got[0]}; next put -> {got[1]!r} in {got[2]:.2f} s")
    if got[0] == 200 or got[2] > 1.0:
        print("DEFECT: after the C syncer's fdatasync failed, the broker still said ready and "
              "took the next put, answering it only after --store-timeout")
        sys.exit(1)
    print("ok: a failed fdatasync of the C syncer is seen at once")


if __name__ == "__main__":
    main()
