"""pigeon:// clients: an ack whose reply is lost (a partition that eats the broker's replies, a
connection cut after the request left) is re-sent on a new connection; the broker, which applied
the first one, answers the repeat `unknown`, and ack() raises LocalProtocolError "the broker no
longer holds it for this client ..., so it was or will be redelivered". It was acked: it is never
redelivered. The same for nack(requeue=False, reason=...): the message sits in NAME.dead and the
caller is told it will come back.

docs/reliability.md (its nemesis table) says of these refused acks "those came back as the dup
column". In a review-6 nemesis run, confirmed puts whose only ack raised this error never came
back: the broker had applied the ack whose reply was lost (a SIGSTOP of the broker; a kill -9
9 ms after the ACK left).

Suspected cause: backends/pigeon/ops.py `Ops.settle` goes through `Ops.call`, which re-sends a
request whose connection broke on a new connection; `Ops.settled` reads any `unknown` id as "not
held, so redelivered", though after a re-send `unknown` also means "already settled by the first
send". (The outcome is indeterminate there, like a put whose reply was lost.)

Here: the client talks to a broker on loopback through a small TCP proxy of this script. After
get_message() the proxy stops forwarding the broker's bytes to the client (the client's bytes
still go through), so the ACK is applied and its reply vanishes; the client gives the silent
connection up after its silence limit (3 heartbeats of 1 s), reconnects through the proxy (new
connections are forwarded normally) and re-sends the ACK.

Run: python r6_nemesis_ack_retry_claims.py   (exit 1 while the defect is present; ~20 s)
"""
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pigeon


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Proxy:
    """Forwards 127.0.0.1:port -> broker; `eat()` drops broker->client bytes of the connections open now."""

    def __init__(self, target):
        self.target = target
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            st = {"eat": False}
            self.conns.append(st)
            threading.Thread(target=self._pump, args=(c, b, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, c, st), daemon=True).start()

    @staticmethod
    def _pump(src, dst, st):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if st is not None and st["eat"]:
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def eat(self):
        for st in self.conns:
            st["eat"] = True


def main():
    bport = free_port()
    data = tempfile.mkdtemp(prefix="r6ack-")
    broker = subprocess.Popen([sys.executable, "-m", "pigeon", "serve", "--port", str(bport), "--data-dir", data,
                               "--heartbeat", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bad = []
    try:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", bport), 0.1).close()
                break
            except OSError:
                time.sleep(0.025)
        for what in ("ack", "reject"):
            qn = f"r6ack-{what}"
            direct = pigeon.Queue(f"pigeon://127.0.0.1:{bport}/{qn}?lease=3")
            direct.put("only")
            proxy = Proxy(bport)
            q = pigeon.Queue(f"pigeon://127.0.0.1:{proxy.port}/{qn}?lease=3")
            m = q.get_message()
            proxy.eat()  # from now on the broker's replies on this connection vanish
            t = time.monotonic()
            try:
                if what == "ack":
                    m.ack()
                else:
                    m.nack(requeue=False, reason="poison")
                outcome = "ok"
            except Exception as e:
                outcome = f"{type(e).__name__}: {e}"
            took = time.monotonic() - t
            try:  # the lease is 3 s and a dropped connection requeues at once: wait longer than both
                direct.get_message(timeout=6).ack()
                came_back = True
            except pigeon.Empty:
                came_back = False
            dead = pigeon.Queue(f"pigeon://127.0.0.1:{bport}/{qn}.dead")
            print(f"{what}: the call took {took:.1f} s -> {outcome!r}")
            print(f"   came back: {came_back}; {qn}.dead holds {dead.qsize()}; "
                  f"acked_total={direct._info()['acked_total']}")
            if "redelivered" in outcome and not came_back:
                bad.append(what)
            for h in (q, direct, dead):
                h.close()
            proxy.ls.close()
    finally:
        broker.kill()
        broker.wait()
        shutil.rmtree(data, ignore_errors=True)
    if bad:
        print(f"DEFECT: {' and '.join(bad)} raised 'so it was or will be redelivered' but had taken effect: "
              "the message never came back")
        sys.exit(1)
    print("ok: no settle claimed a redelivery that did not happen")


if __name__ == "__main__":
    main()
