"""nem6: a Jepsen-style nemesis for pigeon's broker, focused on message options and admin ops.

python nem.py run --seconds 120 --fsync always [--seed N] [--faults a,b,c] [--tmpfs-mb 64]
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

PY = sys.executable
NS = "nem6"
HOST_IP, BROKER_IP = "10.77.6.1", "10.77.6.2"
Q, Q2, P = "nq", "nq2", "np"
TOKEN = "nem6tok"


def sh(*a, check=True):
    r = subprocess.run(a, capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"{a}: {r.stderr}")
    return r.stdout


def nsx(*a, check=True):
    return sh("ip", "netns", "exec", NS, *a, check=check)


# ---------------------------------------------------------------------------------------- net
def net_up():
    net_down()
    sh("ip", "route", "add", "unreachable", "10.77.6.0/24", "metric", "4243")
    sh("ip", "netns", "add", NS)
    nsx("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "nem6h", "type", "veth", "peer", "name", "nem6b")
    sh("ip", "link", "set", "nem6b", "netns", NS)
    sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", "nem6h")
    sh("ip", "link", "set", "nem6h", "up")
    nsx("ip", "addr", "add", f"{BROKER_IP}/24", "dev", "nem6b")
    nsx("ip", "link", "set", "nem6b", "up")


def net_down():
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "link", "del", "nem6h", check=False)
    sh("ip", "route", "del", "unreachable", "10.77.6.0/24", "metric", "4243", check=False)


def nft_set(rules):
    heal_net()
    script = f"table netdev nem6 {{\n chain c {{\n type filter hook ingress device nem6b priority 0;\n {rules}\n }}\n}}\n"
    nsx("nft", "-f", "-", check=False) if False else subprocess.run(
        ["ip", "netns", "exec", NS, "nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


def nft_set_egress_dup(pct):
    for pre, dev in ((["ip", "netns", "exec", NS], "nem6b"), ([], "nem6h")):
        script = (f"table netdev nem6d {{\n chain c {{\n type filter hook egress device {dev} priority 0;\n"
                  f" meta mark != 0x70 numgen random mod 100 < {pct} meta mark set 0x70 dup to {dev}\n }}\n}}\n")
        subprocess.run(pre + ["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


def heal_net():
    nsx("nft", "delete", "table", "netdev", "nem6", check=False)
    nsx("nft", "delete", "table", "netdev", "nem6d", check=False)
    sh("nft", "delete", "table", "netdev", "nem6d", check=False)
    nsx("tc", "qdisc", "del", "dev", "nem6b", "root", check=False)


# ------------------------------------------------------------------------------------ logging
class Log:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, **kw):
        kw.setdefault("t", time.time())
        os.write(self.fd, (json.dumps(kw) + "\n").encode())


def url(queue, **kw):
    u = f"pigeon://:{TOKEN}@{BROKER_IP}:{ARGS_PORT}/{queue}"
    if kw:
        u += "?" + "&".join(f"{k}={v}" for k, v in kw.items())
    return u


ARGS_PORT = int(os.environ.get("NEM6_PORT", "0"))


def opts_draw(rng):
    o = {}
    if rng.random() < 0.35:
        o["delay"] = round(rng.uniform(0.05, 4.0), 3)
    if rng.random() < 0.3:
        o["ttl"] = round(rng.uniform(0.5, 6.0), 3)
    if rng.random() < 0.5:
        o["priority"] = rng.randint(0, 9)
    return o


# ------------------------------------------------------------------------------------ clients
def role_producer(kind, name, logdir, seed):
    import pigeon
    rng = random.Random(seed)
    log = Log(os.path.join(logdir, name + ".jsonl"))
    qname = P if kind == "purgeable" else Q
    q = pigeon.Queue(url(qname, lease=8))
    n = 0
    while True:
        n += 1
        if kind in ("dedup", "purgeable", "plain"):
            mid = f"{name}-{n}"
            o = opts_draw(rng) if kind != "purgeable" else {}
            body = {"id": mid, **o}
            dedup = kind != "plain"
            for attempt in range(6):
                log(ev="attempt", id=mid, q=qname, dedup=dedup, **o)
                try:
                    q.put(body, timeout=5, dedup_id=mid if dedup else None, headers={"id": mid}, **o)
                    log(ev="confirm", id=mid)
                    break
                except Exception as e:
                    log(ev="indet", id=mid, err=f"{type(e).__name__}: {e}"[:200])
                    if not dedup:
                        break
                    time.sleep(0.2)
        elif kind == "batch":
            ids = [f"{name}-{n}-{k}" for k in range(5)]
            o = opts_draw(rng)
            for attempt in range(6):
                for mid in ids:
                    log(ev="attempt", id=mid, q=Q, dedup=True, **o)
                try:
                    q.put_many([{"id": m, **o} for m in ids], timeout=6, dedup_ids=ids, headers={"b": "1"}, **o)
                    for mid in ids:
                        log(ev="confirm", id=mid)
                    break
                except Exception as e:
                    for mid in ids:
                        log(ev="indet", id=mid, err=f"{type(e).__name__}: {e}"[:200])
                    time.sleep(0.2)
        time.sleep(rng.uniform(0, 0.01))


def role_aproducer(name, logdir, seed):
    import pigeon
    log = Log(os.path.join(logdir, name + ".jsonl"))

    async def main():
        aq = pigeon.AsyncQueue(url(Q, lease=8))
        ctr = [0]

        async def worker(w):
            rng = random.Random(seed * 100 + w)
            while True:
                ctr[0] += 1
                mid = f"{name}-{ctr[0]}"
                o = opts_draw(rng)
                for attempt in range(6):
                    log(ev="attempt", id=mid, q=Q, dedup=True, **o)
                    try:
                        await aq.put({"id": mid, **o}, timeout=6, dedup_id=mid, **o)
                        log(ev="confirm", id=mid)
                        break
                    except Exception as e:
                        log(ev="indet", id=mid, err=f"{type(e).__name__}: {e}"[:200])
                        await asyncio.sleep(0.2)
                await asyncio.sleep(rng.uniform(0, 0.02))

        await asyncio.gather(*(worker(w) for w in range(5)))

    asyncio.run(main())


def role_consumer(kind, name, logdir, seed, queue):
    import pigeon
    rng = random.Random(seed)
    log = Log(os.path.join(logdir, name + ".jsonl"))
    q = pigeon.Queue(url(queue, lease=8))
    while True:
        t0 = time.time()
        if kind == "many":
            try:
                items = q.get_many(5, timeout=2)
            except pigeon.Empty:
                continue
            except Exception as e:
                log(ev="geterr", err=f"{type(e).__name__}: {e}"[:200])
                time.sleep(0.1)
                continue
            t1 = time.time()
            for it in items:
                # auto-acked: a delivery that is also an ack (acknowledged "without waiting")
                log(ev="deliver", id=it["id"], q=queue, t0=t0, t1=t1, auto=True)
            continue
        try:
            m = q.get_message(timeout=2)
        except pigeon.Empty:
            continue
        except Exception as e:
            log(ev="geterr", err=f"{type(e).__name__}: {e}"[:200])
            time.sleep(0.1)
            continue
        t1 = time.time()
        mid = m.body["id"]
        log(ev="deliver", id=mid, q=queue, t0=t0, t1=t1, dc=m.delivery_count, h=m.headers)
        r = rng.random()
        try:
            if kind == "slow":
                time.sleep(rng.uniform(0, 1.5))
            if r < 0.08 and queue == Q:
                d = round(rng.uniform(0, 2.5), 3)
                log(ev="nack_start", id=mid, delay=d)
                m.nack(delay=d)
                log(ev="nack_ok", id=mid, delay=d)
            elif r < 0.11 and queue == Q:
                log(ev="reject_start", id=mid)
                m.nack(requeue=False, reason="rej")
                log(ev="reject_ok", id=mid)
            elif r < 0.16:
                m.extend(rng.uniform(1, 10))
                log(ev="extend_ok", id=mid)
                log(ev="ack_start", id=mid)
                m.ack()
                log(ev="ack_ok", id=mid, q=queue)
            else:
                log(ev="ack_start", id=mid)
                m.ack()
                log(ev="ack_ok", id=mid, q=queue)
        except Exception as e:
            log(ev="settle_err", id=mid, err=f"{type(e).__name__}: {e}"[:200])


def role_aconsumer(name, logdir, seed):
    import pigeon
    log = Log(os.path.join(logdir, name + ".jsonl"))

    async def main():
        aq = pigeon.AsyncQueue(url(Q, lease=8))

        async def worker(w):
            while True:
                t0 = time.time()
                try:
                    m = await aq.get_message(timeout=2)
                except pigeon.Empty:
                    continue
                except Exception as e:
                    log(ev="geterr", err=f"{type(e).__name__}: {e}"[:200])
                    await asyncio.sleep(0.1)
                    continue
                t1 = time.time()
                mid = m.body["id"]
                log(ev="deliver", id=mid, q=Q, t0=t0, t1=t1, dc=m.delivery_count)
                try:
                    log(ev="ack_start", id=mid)
                    await m.ack()
                    log(ev="ack_ok", id=mid, q=Q)
                except Exception as e:
                    log(ev="settle_err", id=mid, err=f"{type(e).__name__}: {e}"[:200])

        await asyncio.gather(*(worker(w) for w in range(3)))

    asyncio.run(main())


def role_admin(name, logdir, seed):
    """MOVE some ready messages Q -> Q2 now and then; PURGE P now and then."""
    import pigeon
    rng = random.Random(seed)
    log = Log(os.path.join(logdir, name + ".jsonl"))
    q = pigeon.Queue(url(Q, lease=8))
    p = pigeon.Queue(url(P, lease=8))
    while True:
        time.sleep(rng.uniform(0.5, 2.5))
        try:
            if rng.random() < 0.5:
                t0 = time.time()
                n = q.move_to(Q2, limit=rng.randint(1, 30))
                log(ev="move_ok", n=n, t0=t0)
            else:
                t0 = time.time()
                log(ev="purge_start", t0=t0)
                n = p.purge()
                log(ev="purge_ok", n=n, t0=t0)
        except Exception as e:
            log(ev="admin_err", err=f"{type(e).__name__}: {e}"[:200])


# -------------------------------------------------------------------------------------- runner
class Runner:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.dir = tempfile.mkdtemp(prefix="nem6run-")
        self.logdir = os.path.join(self.dir, "logs")
        os.makedirs(self.logdir)
        self.mnt = None
        self.data = os.path.join(self.dir, "data")
        if a.tmpfs_mb:
            self.mnt = os.path.join(self.dir, "mnt")
            os.makedirs(self.mnt)
            sh("mount", "-t", "tmpfs", "-o", f"size={a.tmpfs_mb}m", "tmpfs", self.mnt)
            self.data = os.path.join(self.mnt, "data")
        os.makedirs(self.data)
        self.port = self.rng.randint(20000, 60000)
        os.environ["NEM6_PORT"] = str(self.port)
        global ARGS_PORT
        ARGS_PORT = self.port
        self.broker = None
        self.procs = {}
        self.events = Log(os.path.join(self.logdir, "nemesis.jsonl"))
        self.starts = 0

    # broker
    def start_broker(self, wait=True):
        cmd = ["ip", "netns", "exec", NS, PY, "-m", "pigeon", "serve", "--host", BROKER_IP, "--port",
               str(self.port), "--token", TOKEN, "--data-dir", self.data, "--fsync", self.a.fsync,
               "--heartbeat", "1", "--peer-timeout", "4"] + self.a.broker_args.split()
        if self.a.memory:
            cmd = [c for c in cmd if c not in ("--data-dir", self.data, "--fsync", self.a.fsync)] + ["--memory"]
        self.broker = subprocess.Popen(cmd, stdout=open(os.path.join(self.dir, "broker.log"), "ab"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        self.events(ev="broker_start", pid=self.broker.pid)
        if wait:
            self.wait_broker()

    def wait_broker(self, limit=30):
        t = time.time()
        while time.time() - t < limit:
            if self.broker.poll() is not None:
                self.events(ev="broker_exited", rc=self.broker.returncode)
                return False
            r = subprocess.run(["ip", "netns", "exec", NS, "bash", "-c",
                                f"exec 3<>/dev/tcp/{BROKER_IP}/{self.port}"], capture_output=True)
            if r.returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def kill_broker(self, sig=signal.SIGKILL):
        if self.broker and self.broker.poll() is None:
            try:
                os.kill(self.broker.pid, signal.SIGCONT)
                os.kill(self.broker.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.broker.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.broker.pid, signal.SIGKILL)
                self.broker.wait()
                self.events(ev="term_hang")
            self.events(ev="broker_stopped", sig=int(sig), rc=self.broker.returncode)

    # clients
    def spawn(self, name, *argv):
        seed = self.rng.randint(0, 10**9)
        p = subprocess.Popen([PY, __file__, "role", name + f"_{seed % 10000}", self.logdir, str(seed), *argv],
                             stdout=open(os.path.join(self.logdir, "client.out"), "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p

    def spawn_all(self):
        for kind in ("dedup", "batch", "plain", "purgeable"):
            self.spawn("p" + kind, "producer", kind)
        self.spawn("pasync", "aproducer")
        self.spawn("cplain", "consumer", "plain", Q)
        self.spawn("cslow", "consumer", "slow", Q)
        self.spawn("cmany", "consumer", "many", Q)
        self.spawn("cq2", "consumer", "plain", Q2)
        self.spawn("casync", "aconsumer")
        self.spawn("admin", "admin")

    def kill_proc(self, name, sig=signal.SIGKILL):
        p = self.procs.get(name)
        if p and p.poll() is None:
            os.kill(p.pid, sig)
            p.wait()

    # the nemesis
    FAULTS = ["kill", "kill_down", "kill_twice", "term", "pause", "partition", "loss", "dup", "slow",
              "client_kill", "consumer_stop", "diskfull", "backlog_kill"]

    def fault(self, f):
        rng = self.rng
        self.events(ev="fault", f=f)
        if f == "kill":
            self.kill_broker(); self.start_broker()
        elif f == "kill_down":  # down long enough for delays and ttls to pass
            self.kill_broker(); time.sleep(rng.uniform(1, 7)); self.start_broker()
        elif f == "kill_twice":
            self.kill_broker(); self.start_broker(wait=False); time.sleep(rng.uniform(0.05, 0.6))
            self.kill_broker(); self.start_broker()
        elif f == "term":
            self.kill_broker(signal.SIGTERM); self.start_broker()
        elif f == "pause":
            os.kill(self.broker.pid, signal.SIGSTOP); time.sleep(rng.uniform(2, 9))
            os.kill(self.broker.pid, signal.SIGCONT)
        elif f == "partition":
            nft_set("drop"); time.sleep(rng.uniform(2, 10)); heal_net()
        elif f == "loss":
            nft_set(f"numgen random mod 100 < {rng.randint(5, 35)} drop"); time.sleep(rng.uniform(3, 10)); heal_net()
        elif f == "dup":
            nft_set_egress_dup(rng.randint(10, 50)); time.sleep(rng.uniform(3, 10)); heal_net()
        elif f == "slow":
            nsx("tc", "qdisc", "add", "dev", "nem6b", "root", "tbf", "rate", f"{rng.choice([64, 256, 1024])}kbit",
                "burst", "16kbit", "latency", "500ms")
            time.sleep(rng.uniform(3, 8)); heal_net()
        elif f == "client_kill":
            name = rng.choice([n for n in self.procs if n != "admin"])
            self.events(ev="client_kill", name=name)
            self.kill_proc(name)
            self.respawn(name)
        elif f == "consumer_stop":
            name = rng.choice(["cplain", "cslow", "casync", "cq2"])
            p = self.procs[name]
            os.kill(p.pid, signal.SIGSTOP); time.sleep(rng.uniform(3, 11)); os.kill(p.pid, signal.SIGCONT)
        elif f == "backlog_kill":
            cs = ["cplain", "cslow", "cmany", "cq2", "casync"]
            for c in cs:
                os.kill(self.procs[c].pid, signal.SIGSTOP)
            time.sleep(rng.uniform(1, 4))
            self.kill_broker(); time.sleep(rng.uniform(0, 3)); self.start_broker()
            for c in cs:
                os.kill(self.procs[c].pid, signal.SIGCONT)
        elif f == "diskfull":
            if not self.mnt:
                return
            path = os.path.join(self.mnt, "ballast")
            try:
                with open(path, "wb") as fh:
                    while True:
                        fh.write(b"\0" * 65536)
            except OSError:
                pass
            held = rng.uniform(2, 8)
            if rng.random() < 0.4:
                time.sleep(held / 2); self.events(ev="kill_while_full")
                self.kill_broker(); self.start_broker(); time.sleep(held / 2)
            else:
                time.sleep(held)
            os.unlink(path)

    def respawn(self, name):
        table = {"pdedup": ("producer", "dedup"), "pbatch": ("producer", "batch"), "pplain": ("producer", "plain"),
                 "ppurgeable": ("producer", "purgeable"), "pasync": ("aproducer",),
                 "cplain": ("consumer", "plain", Q), "cslow": ("consumer", "slow", Q),
                 "cmany": ("consumer", "many", Q), "cq2": ("consumer", "plain", Q2), "casync": ("aconsumer",),
                 "admin": ("admin",)}
        self.spawn(name, *table[name])

    def run(self):
        a = self.a
        net_up()
        try:
            self.start_broker()
            self.spawn_all()
            faults = a.faults.split(",") if a.faults else self.FAULTS
            t_end = time.time() + a.seconds
            time.sleep(2)
            while time.time() < t_end:
                f = self.rng.choice(faults)
                try:
                    self.fault(f)
                except Exception as e:
                    self.events(ev="fault_err", f=f, err=repr(e))
                    print("fault error", f, e, flush=True)
                if self.broker.poll() is not None:
                    self.events(ev="broker_died", rc=self.broker.returncode)
                    print("broker died rc", self.broker.returncode, flush=True)
                    self.start_broker()
                time.sleep(self.rng.uniform(1, 3))
            heal_net()
            self.events(ev="healed")
            time.sleep(3)
            for n in [n for n in self.procs if n.startswith("p")] + ["admin"]:
                self.kill_proc(n, signal.SIGKILL)
            self.events(ev="producers_stopped")
            # let consumers drain; delayed messages up to 4 s + nack delays 2.5 s
            self.drain_wait()
            for n in list(self.procs):
                self.kill_proc(n)
            self.final_drain("final")
            self.kill_broker()
            self.start_broker()
            self.final_drain("resurrect")
            self.kill_broker(signal.SIGTERM)
        finally:
            for n in list(self.procs):
                try:
                    self.kill_proc(n)
                except Exception:
                    pass
            if self.broker and self.broker.poll() is None:
                self.kill_broker()
            net_down()
            if self.mnt:
                sh("umount", "-l", self.mnt, check=False)
        print("run dir", self.dir)
        return check(self.dir, self.a)

    def drain_wait(self):
        import pigeon
        q = pigeon.Queue(url(Q))
        q2 = pigeon.Queue(url(Q2))
        t = time.time()
        while time.time() - t < 40:
            try:
                if q.qsize() == 0 and q2.qsize() == 0:
                    i = q._info()
                    if not i.get("in_flight", i.get("unacked", 0)):
                        break
            except Exception:
                pass
            time.sleep(1)
        time.sleep(3)
        q.close(); q2.close()

    def final_drain(self, phase):
        import pigeon
        log = Log(os.path.join(self.logdir, f"drain_{phase}.jsonl"))
        for qn in (Q, Q2, Q + ".dead", P):
            q = pigeon.Queue(url(qn))
            while True:
                try:
                    shown = q.peek(50)
                except Exception as e:
                    log(ev="drain_err", q=qn, err=repr(e)); time.sleep(0.5); continue
                if not shown:
                    break
                for m in shown:
                    log(ev="peek", q=qn, id=(m["body"] or {}).get("id"), reason=m.get("reason"), age=m.get("age"),
                        dc=m.get("delivery_count"), origin=m.get("origin"))
                t0 = time.time()
                msgs = []
                for _ in shown:
                    try:
                        msgs.append(q.get_message(timeout=1))
                    except pigeon.Empty:
                        break
                for m in msgs:
                    log(ev="deliver", q=qn, id=m.body["id"], t0=t0, t1=time.time(), drain=phase)
                    m.ack()
                    log(ev="ack_ok", q=qn, id=m.body["id"], drain=phase)
            log(ev="drained", q=qn, qsize=q.qsize(), info=str(q._info())[:300])
            q.close()


# --------------------------------------------------------------------------------------- check
def load(d):
    evs = []
    for f in os.listdir(os.path.join(d, "logs")):
        if f.endswith(".jsonl"):
            src = f[:-6]
            for line in open(os.path.join(d, "logs", f)):
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                e["src"] = src
                evs.append(e)
    evs.sort(key=lambda e: e["t"])
    return evs


def check(d, a=None):
    evs = load(d)
    att, conf, indet = {}, {}, set()
    first_att = {}
    for e in evs:
        if e["ev"] == "attempt":
            att[e["id"]] = e
            first_att.setdefault(e["id"], e)
        elif e["ev"] == "confirm":
            conf[e["id"]] = e["t"]
        elif e["ev"] == "indet":
            indet.add(e["id"])
    deliveries = {}
    acks = {}
    for e in evs:
        if e["ev"] == "deliver" and e["src"] != "drain_resurrect":
            deliveries.setdefault(e["id"], []).append(e)
        if e["ev"] == "ack_ok" or (e["ev"] == "deliver" and e.get("auto")):
            acks.setdefault(e["id"], []).append(e)
    nacks = {}
    for e in evs:
        if e["ev"] == "nack_start":
            nacks.setdefault(e["id"], []).append(e)
    rejects = {e["id"] for e in evs if e["ev"] == "reject_ok"}
    dead = {}
    for e in evs:
        if e["ev"] == "peek" and e["q"] == Q + ".dead" and e["src"] == "drain_final":
            dead[e["id"]] = e
    purges = [e for e in evs if e["ev"] == "purge_ok"]
    problems = {}

    def bad(kind, msg):
        problems.setdefault(kind, []).append(msg)

    # lost
    qids = [i for i in conf if att[i]["q"] == Q]
    settle_tried = {e["id"] for e in evs if e["ev"] in ("ack_start", "reject_start", "nack_start")}
    for i in qids:
        if i not in acks and i not in dead and i in settle_tried and any(
                e["ev"] == "settle_err" and e.get("id") == i for e in evs):
            bad("settle_err_never_back", f"{i}: its settle raised, it never came back")
        elif i not in acks and i not in dead:
            bad("lost", f"{i} confirmed {conf[i]:.3f} opts={ {k: att[i].get(k) for k in ('delay', 'ttl', 'priority')} } deliveries={len(deliveries.get(i, []))}")
    # dead letters accounted
    for i, e in dead.items():
        r = e["reason"]
        a0 = att.get(i)
        if a0 is None:
            bad("unexpected", f"dead {i}")
            continue
        if r == "expired" and not a0.get("ttl"):
            bad("dead_no_ttl", f"{i} expired without a ttl")
        if r == "rej" and i not in rejects and not any(x["ev"] == "reject_start" for x in evs if x.get("id") == i):
            bad("dead_reason", f"{i} rej without a reject")
        if i in acks and a0.get("dedup"):
            okacks = [x for x in acks[i] if x["src"] != "drain_final" and not x.get("auto")]
            if okacks:
                bad("acked_and_dead", f"{i} acked at {okacks[0]['t']:.3f} and dead ({r})")
    # unexpected
    for i in deliveries:
        if i not in att:
            bad("unexpected", i)
    # delivered after a successful ack (dedup ids only: one stored copy)
    for i, ds in deliveries.items():
        if i not in att or not att[i].get("dedup"):
            continue
        oks = [x["t"] for x in acks.get(i, []) if not x.get("auto")]  # get()'s quiet ack is not waited for
        if not oks:
            continue
        first_ok = min(oks)
        for dd in ds:
            if dd["t0"] > first_ok + 0.001:
                bad("redelivered_after_ack", f"{i} acked {first_ok:.3f}, delivered again (get started {dd['t0']:.3f}, q={dd['q']}, dc={dd.get('dc')})")
                break
        if len([x for x in acks.get(i, []) if not x.get("auto")]) > 1:
            bad("acked_twice", f"{i}")
    # early delivery / delivered past ttl
    for i, ds in deliveries.items():
        a0 = first_att.get(i)
        if not a0 or a0["q"] != Q:
            continue
        delay = a0.get("delay") or 0
        for dd in ds:
            if dd["q"] != Q or dd.get("drain"):
                continue
            if dd["t1"] < a0["t"] + delay - 0.002:
                bad("early", f"{i} delay {delay} attempted {a0['t']:.3f} delivered by {dd['t1']:.3f} ({dd['t1'] - a0['t']:.3f} s after)")
        # nack delays
        for n in nacks.get(i, []):
            later = [dd for dd in ds if dd["t0"] > n["t"] and dd["q"] == Q]
            if later and later[0]["t1"] < n["t"] + n["delay"] - 0.002:
                bad("early_after_nack", f"{i} nack delay {n['delay']} at {n['t']:.3f}, redelivered by {later[0]['t1']:.3f}")
        ttl = att[i].get("ttl")
        if ttl and i in conf:
            exp = conf[i] + delay + ttl
            for dd in ds:
                if dd["q"] == Q and dd["t0"] > exp + 0.3:
                    bad("past_ttl", f"{i} ttl {ttl} delay {delay} expires by {exp:.3f}, handed out after {dd['t0']:.3f} (+{dd['t0'] - exp:.2f} s)")
                    break
    # purge: nothing purged comes back; after the end, P has only ids attempted after the last purge
    # resurrected
    for e in evs:
        if e["src"] == "drain_resurrect" and e["ev"] == "deliver" and e["q"] != P:
            bad("resurrected", f"{e['id']} in {e['q']}")
    lastp = [p for p in purges]
    for e in evs:
        if e["src"] in ("drain_final", "drain_resurrect") and e["ev"] == "deliver" and e["q"] == P:
            i = e["id"]
            # find a purge that started after this id was confirmed and completed
            c = conf.get(i)
            la = att[i]["t"] if i in att else None
            for p in lastp:
                if c is not None and la is not None and p["t0"] > c and p["t0"] > la:
                    bad("purged_came_back", f"{i} confirmed {c:.3f}, purge at {p['t0']:.3f} returned {p['n']} ({e['src']})")
                    break
    errors = [e for e in evs if e["ev"] in ("geterr", "settle_err", "admin_err")]
    errkinds = {}
    for e in errors:
        k = e["err"].split(":")[0] + ":" + e["err"][len(e["err"].split(":")[0]) + 1:][:60]
        errkinds[k] = errkinds.get(k, 0) + 1
    nfault = {}
    for e in evs:
        if e["ev"] == "fault":
            nfault[e["f"]] = nfault.get(e["f"], 0) + 1
    ndel = sum(len(v) for v in deliveries.values())
    summary = dict(attempted=len(att), confirmed=len(conf), indet=len(indet), delivered=ndel,
                   distinct=len(deliveries), dead=len(dead), purges=len(purges), faults=nfault,
                   starts=sum(1 for e in evs if e["ev"] == "broker_start"))
    print(json.dumps(summary))
    print("client errors (top):")
    for k, v in sorted(errkinds.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {v:5d} {k}")
    for k, v in problems.items():
        print(f"PROBLEM {k}: {len(v)}")
        for m in v[:8]:
            print("   ", m)
    blog = os.path.join(d, "broker.log")
    if os.path.exists(blog):
        txt = open(blog, errors="replace").read()
        tb = txt.count("Traceback")
        print("broker log tracebacks:", tb)
        if tb:
            i = txt.index("Traceback")
            print(txt[max(0, i - 300): i + 1500])
    out = os.path.join(d, "logs", "client.out")
    if os.path.exists(out) and os.path.getsize(out):
        print("client output:", open(out, errors="replace").read()[-1500:])
    return 1 if problems else 0


def main():
    if sys.argv[1] == "role":
        name, logdir, seed, role = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        rest = sys.argv[6:]
        if role == "producer":
            role_producer(rest[0], name, logdir, seed)
        elif role == "aproducer":
            role_aproducer(name, logdir, seed)
        elif role == "consumer":
            role_consumer(rest[0], name, logdir, seed, rest[1])
        elif role == "aconsumer":
            role_aconsumer(name, logdir, seed)
        elif role == "admin":
            role_admin(name, logdir, seed)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--fsync", default="always")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--faults", default="")
    ap.add_argument("--tmpfs-mb", type=int, default=0)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--broker-args", default="")
    ap.add_argument("--dir", default="")
    a = ap.parse_args()
    if a.cmd == "check":
        sys.exit(check(a.dir, a))
    if a.seed is None:
        a.seed = random.randrange(10**6)
    print("seed", a.seed, flush=True)
    sys.exit(Runner(a).run())


if __name__ == "__main__":
    main()
