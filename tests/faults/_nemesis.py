"""A Jepsen-style nemesis against ``pigeon serve``: the harness behind
``tests/faults/test_nemesis.py`` and ``scripts/nemesis.py``.

# Strategy:
# The broker runs in a network namespace joined to the host by a veth pair (``_netns.Link``),
# durable on a data directory that outlives its restarts. Nine client processes on the host
# side (``_nemesis_clients.py``: five producers, four consumers), each leaving from its own
# address, log every id they attempt, get acknowledged, see fail and receive. The nemesis
# makes one fault at a time with calm between, drawn from a seeded ``random.Random``:
# partitions (all clients, some, one direction), packet loss, duplication, a slow link,
# netem delay where the kernel has it, the broker killed (also with a backlog of confirmed
# puts waiting), paused past its heartbeat or stopped with SIGTERM, a producer killed in a
# call and a consumer killed holding a message, a consumer paused past its lease. Then it
# heals, checks that every client works again, stops the producers, lets the consumers
# drain the queue, drains QUEUE and QUEUE.dead itself, kills the broker once more,
# restarts it and looks for anything that comes back; ``_nemesis_check`` judges the logs.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pigeon
from tests.faults import _nemesis_clients as clients
from tests.faults._nemesis_check import History, Verdict, check
from tests.faults._netns import Link, Partition

CLIENTS_SCRIPT = Path(clients.__file__)
PORT = 7878  # the namespace is ours: no other listener there

# kind: (shortest, longest) seconds it lasts in a long run; a CI run squeezes the longest
# into its share of the time (``plan``)
FAULTS: dict[str, tuple[float, float]] = {
    "partition-all": (2, 16),
    "partition-some": (2, 16),
    "partition-oneway": (2, 16),
    "loss": (3, 15),
    "dup": (3, 15),
    "slow": (3, 12),
    "netem": (3, 12),
    "kill": (0, 0),
    "kill-backlog": (2, 5),  # consumers SIGSTOPped for this long, then the broker killed
    "kill-partitioned": (2, 8),  # every client cut off, the broker killed and restarted
    "kill-twice": (0, 0),  # killed, restarted, killed again while it starts
    "kill-lossy": (2, 8),  # 20 % of the packets lost, the broker killed and restarted
    "term": (0, 0),
    "term-partitioned": (2, 8),  # some clients cut off, SIGTERM, restart
    "pause": (0, 0),  # SIGSTOP: past the heartbeat (set from the heartbeat in ``plan``)
    "kill-producer": (1, 4),  # how long to wait for it to be inside a call
    "kill-consumer": (1, 4),  # how long to wait for it to hold a message
    "stop-consumer": (0, 0),  # SIGSTOP past the lease (set from the lease in ``plan``)
}
CI_FAULTS = (
    "partition-all", "partition-some", "partition-oneway", "loss", "dup", "slow", "netem",
    "kill", "kill-backlog", "pause", "kill-producer", "kill-consumer",
)  # fmt: skip
LOSSY = ("--memory", "never")  # setups that may lose confirmed puts to kill -9


@dataclass
class Options:
    workdir: Path
    seconds: float = 60.0  # of faults and the calm between them
    seed: int = 0
    faults: tuple[str, ...] = CI_FAULTS
    every_once: bool = True  # each kind once, in a seeded order (CI); else drawn at random
    store: str = "log"
    fsync: str = "always"
    memory: bool = False
    segment_bytes: int | None = None
    heartbeat: float = 1.0
    lease: float = 10.0
    max_deliveries: int = 20
    pace: float = 0.02  # a producer's sleep between calls, per item
    calm: tuple[float, float] = (1.0, 2.0)
    say: Callable[[str], None] = print

    @property
    def may_lose(self) -> bool:
        return self.memory or self.fsync == "never"

    @property
    def setup(self) -> str:
        if self.memory:
            return "`--memory` (control)"
        seg = f" ({self.segment_bytes} B segments)" if self.segment_bytes else ""
        extra = f", max_deliveries={self.max_deliveries}" if self.max_deliveries != 20 else ""
        return f"{self.store}{seg}, {self.fsync}{extra}"


@dataclass(frozen=True)
class Fault:
    kind: str
    seconds: float
    calm: float


def plan(opts: Options, rng: random.Random, have_netem: bool) -> list[Fault]:
    """The faults of a run, and the calm before each: at most ``opts.seconds`` in all."""
    kinds = [k for k in opts.faults if have_netem or k != "netem"]

    def span(kind: str, budget: float) -> float:
        lo, hi = FAULTS[kind]
        if kind == "pause":  # past the heartbeat; in a long run, past the silence limit too
            lo, hi = opts.heartbeat * 1.5, max(opts.heartbeat * 1.5, opts.heartbeat * 4)
        elif kind == "stop-consumer":
            lo, hi = opts.lease + 1, opts.lease + 5
        return rng.uniform(lo, max(lo, min(hi, budget)))

    faults: list[Fault] = []
    spent = 0.0
    if opts.every_once:
        order = list(kinds)
        rng.shuffle(order)
        share = opts.seconds / max(1, len(order))
        for kind in order:
            calm = rng.uniform(*opts.calm)
            faults.append(Fault(kind, span(kind, share - calm), calm))
        return faults
    while True:
        kind = rng.choice(kinds)
        calm = rng.uniform(*opts.calm)
        f = Fault(kind, span(kind, opts.seconds - spent - calm), calm)
        if spent + f.calm + f.seconds > opts.seconds:
            return faults
        faults.append(f)
        spent += f.calm + f.seconds


class Broker:
    """``pigeon serve`` inside the link's namespace, restarted on the same data directory."""

    def __init__(self, link: Link, opts: Options, token: str) -> None:
        self.link = link
        self.log = opts.workdir / "broker.log"
        args = ["--host", link.broker_ip, "--port", str(PORT), "--token", token,
                "--heartbeat", str(opts.heartbeat)]  # fmt: skip
        if opts.memory:
            args.append("--memory")
        else:
            args += ["--data-dir", str(opts.workdir / "data"), "--fsync", opts.fsync,
                     "--store", opts.store]  # fmt: skip
        if opts.segment_bytes:
            args += ["--segment-bytes", str(opts.segment_bytes)]
        self.argv = link.ns.argv(sys.executable, "-m", "pigeon", "serve", *args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []  # exit codes of the SIGTERM stops

    def start(self, wait: bool = True) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 90.0) -> None:
        """Until it listens (seen from inside the namespace: clients may be cut off)."""
        want = f"{self.link.broker_ip}:{PORT}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the broker exited ({self.proc.returncode}): {self.tail()}")
            if want in self.link.ns.run("ss", "-Hltn", check=False):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the broker did not listen within {timeout:g} s: {self.tail()}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def term(self, timeout: float = 30.0) -> bool:
        """SIGTERM; whether it exited within ``timeout`` (its code goes to ``exits``)."""
        if self.proc is None:
            return True
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.exits.append(self.proc.wait(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            return False
        return True

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def errors(self) -> list[str]:
        """Unhandled exceptions the broker logged (a clean run has none)."""
        if not self.log.exists():
            return []
        lines = self.log.read_text(errors="replace").splitlines()
        return [ln for ln in lines if "Traceback" in ln or "Exception in callback" in ln]


@dataclass
class Client:
    role: str
    slot: int
    incarnation: int
    log: Path
    proc: subprocess.Popen[bytes]

    def last_record(self) -> str:
        """The kind of the last record in its log ('' if none yet)."""
        with open(self.log, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log) - 400))
            lines = f.read().decode(errors="replace").splitlines()
        parts = lines[-1].split() if lines else []
        return parts[1] if len(parts) > 1 else ""

    def records_after(self, t: float, kinds: str) -> bool:
        """Whether it logged a record of one of ``kinds`` after ``time.monotonic() == t``."""
        with open(self.log, errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1] in kinds and float(parts[0]) > t:
                    return True
        return False


@dataclass
class Run:
    """One nemesis run; ``with Run(opts) as run: verdict = run.go()``."""

    opts: Options
    link: Link = field(init=False)
    broker: Broker = field(init=False)
    clients: dict[str, Client] = field(init=False, default_factory=dict)
    hangs: list[str] = field(init=False, default_factory=list)
    started: float = field(init=False, default=0.0)
    faults_done: int = field(init=False, default=0)
    planned_seconds: float = field(init=False, default=0.0)  # of faults and calm
    early_exits: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        o = self.opts
        self.rng = random.Random(o.seed)
        self.runs = o.workdir / "logs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self._incarnations = 0
        self.token = f"nemesis{self.rng.randrange(10**9)}"

    def __enter__(self) -> Run:
        self.link = Link(clients=16, rng=self.rng)
        try:
            self.broker = Broker(self.link, self.opts, self.token)
        except BaseException:
            self.link.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.clients.values():
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()
            c.proc.wait(30)
        self.broker.kill()
        self.link.close()

    def url(self, queue: str = "nemesis") -> str:
        o = self.opts
        return (f"pigeon://{self.token}@{self.link.broker_ip}:{PORT}/{queue}"
                f"?lease={o.lease:g}&max_deliveries={o.max_deliveries}")  # fmt: skip

    def say(self, text: str) -> None:
        self.opts.say(f"[{time.monotonic() - self.started:6.1f}] {text}")

    # --- clients ---------------------------------------------------------------------------

    def spawn(self, role: str, slot: int) -> Client:
        self._incarnations += 1
        n = self._incarnations
        letter = clients.ROLES[role][0]
        log = self.runs / f"{role}-{n}.log"
        with open(self.runs / f"{role}-{n}.out", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(CLIENTS_SCRIPT), role, "--url", self.url(),
                 "--source", self.link.client_ip(slot), "--log", str(log),
                 "--run-dir", str(self.opts.workdir), "--prefix", f"{letter}{n}",
                 "--pace", str(self.opts.pace), "--seed", str(self.rng.randrange(2**32))],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        log.touch()
        self.clients[role] = c = Client(role, slot, n, log, proc)
        return c

    def respawn(self, c: Client) -> None:
        if c.proc.poll() is not None:
            self.early_exits.append(f"{c.role}-{c.incarnation} exited {c.proc.returncode}")
        with contextlib.suppress(ProcessLookupError):
            c.proc.kill()
        c.proc.wait(30)
        self.spawn(c.role, c.slot)

    def wait_working(self, since: float, timeout: float, why: str) -> None:
        """Until every client has done a call that worked after ``since``; a client that
        has not within ``timeout`` is a hang."""
        deadline = time.monotonic() + timeout
        waiting = list(self.clients.values())
        while waiting and time.monotonic() < deadline:
            waiting = [c for c in waiting if not c.records_after(since, "kde")]
            time.sleep(0.2)
        for c in waiting:
            self.hangs.append(f"{c.role} did no call that worked within {timeout:g} s {why}")

    def signal_group(self, roles: tuple[str, ...], sig: int) -> None:
        for role in roles:
            with contextlib.suppress(ProcessLookupError):
                self.clients[role].proc.send_signal(sig)

    # --- the run ---------------------------------------------------------------------------

    def go(self) -> Verdict:
        self.started = time.monotonic()
        self.broker.start()
        for slot, role in enumerate(clients.PRODUCERS + clients.CONSUMERS):
            self.spawn(role, slot)
        self.wait_working(0.0, 120, "of its start")
        if self.hangs:
            raise RuntimeError(f"the clients did not start: {self.hangs}; see {self.runs}")
        have_netem = self.link.has_netem()
        if "netem" in self.opts.faults and not have_netem:
            self.say("netem: this kernel has no sch_netem; delay and reordering come only from "
                     "the tbf queue and TCP retransmissions")  # fmt: skip
        faults = plan(self.opts, self.rng, have_netem)
        self.planned_seconds = sum(f.seconds + f.calm for f in faults)
        self.say(f"seed {self.opts.seed}: {len(faults)} faults planned, "
                 f"{self.planned_seconds:.0f} s")  # fmt: skip
        for f in faults:
            time.sleep(f.calm)
            self.say(f"{f.kind} for {f.seconds:.1f} s")
            getattr(self, "fault_" + f.kind.replace("-", "_"))(f.seconds)
            self.faults_done += 1
        return self.finish()

    def finish(self) -> Verdict:
        self.link.heal()
        self.broker.signal(signal.SIGCONT)
        self.signal_group(clients.CONSUMERS, signal.SIGCONT)
        healed = time.monotonic()
        self.say("healed; every client must work again")
        self.wait_working(healed, 60, "of the last heal")
        self.stop_group("producers", clients.PRODUCERS, 90)
        self.say("producers stopped; the consumers drain the queue")
        self.wait_drained(180)
        self.stop_group("consumers", clients.CONSUMERS, 60)
        drain = clients.Log(str(self.runs / "drain.log"))
        for queue in ("nemesis", "nemesis.dead"):
            self.drain(queue, drain, 2.0)
        self.say("drained; kill -9 and restart: does anything come back?")
        self.broker.kill()
        self.broker.start()
        back_log = self.opts.workdir / "resurrected.log"
        back = clients.Log(str(back_log))
        for queue in ("nemesis", "nemesis.dead"):
            self.drain(queue, back, 3.0)
        if not self.broker.term(60):
            self.hangs.append("the broker did not stop within 60 s of SIGTERM")
        history = History().read(sorted(self.runs.glob("*.log")))
        errors = self.broker.errors() + [
            f"exit code {c} after SIGTERM" for c in self.broker.exits if c
        ]
        return check(history, History().read([back_log]), self.hangs, errors)

    def stop_group(self, group: str, roles: tuple[str, ...], timeout: float) -> None:
        for role in roles:
            c = self.clients[role]
            if c.proc.poll() is not None:
                self.early_exits.append(f"{role}-{c.incarnation} exited {c.proc.returncode}")
        (self.opts.workdir / f"stop-{group}").touch()
        deadline = time.monotonic() + timeout
        for role in roles:
            c = self.clients[role]
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.hangs.append(f"{role} did not stop within {timeout:g} s")
                c.proc.kill()
                c.proc.wait(30)

    def queue_info(self, queue: str = "nemesis") -> dict[str, Any]:
        with pigeon.Queue(self.url(queue)) as q:
            stats: dict[str, Any] = q.stats()  # type: ignore[attr-defined]
        info: dict[str, Any] = stats["queues"].get(queue, {})
        return info

    def wait_drained(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                info = self.queue_info()
            except pigeon.PigeonError as exc:
                info = {"error": repr(exc)}
            if not any(info.get(k) for k in ("depth", "in_flight", "delayed", "error")):
                return
            time.sleep(0.5)
        self.hangs.append(f"the queue did not drain within {timeout:g} s: {info}")

    def drain(self, queue: str, log: clients.Log, timeout: float) -> None:
        """Take and ack everything left in ``queue`` (logged to ``log``)."""
        with pigeon.Queue(self.url(queue)) as q:
            failures = 0
            while failures < 10:
                try:
                    msg = q.get_message(timeout=timeout)
                except pigeon.Empty:
                    return
                except pigeon.BrokenResourceError:
                    failures += 1
                    continue
                log("d", msg.body, msg.delivery_count)
                try:
                    msg.ack()
                    log("s", msg.body)
                except pigeon.PigeonError as exc:
                    log("f", msg.body, type(exc).__name__)
        self.hangs.append(f"{queue} could not be drained: 10 connection failures")

    # --- the faults ------------------------------------------------------------------------

    def _cut(self, p: Partition, seconds: float) -> None:
        self.link.partition(p)
        time.sleep(seconds)
        self.link.heal()

    def some_clients(self) -> tuple[str, ...]:
        slots = sorted({c.slot for c in self.clients.values()})
        chosen = self.rng.sample(slots, self.rng.randint(1, len(slots) - 1))
        return tuple(self.link.client_ip(s) for s in sorted(chosen))

    def fault_partition_all(self, seconds: float) -> None:
        self._cut(Partition(), seconds)

    def fault_partition_some(self, seconds: float) -> None:
        self._cut(Partition(self.some_clients()), seconds)

    def fault_partition_oneway(self, seconds: float) -> None:
        who = self.some_clients() if self.rng.random() < 0.5 else None
        direction = self.rng.choice(("to-broker", "from-broker"))
        self.say(f"  {direction}, {'some clients' if who else 'every client'}")
        self._cut(Partition(who, direction), seconds)

    def fault_loss(self, seconds: float) -> None:
        percent = self.rng.randint(5, 40)
        self.say(f"  {percent} % of the packets lost")
        self.link.loss(percent)
        time.sleep(seconds)
        self.link.heal()

    def fault_dup(self, seconds: float) -> None:
        percent = self.rng.randint(10, 50)
        self.say(f"  {percent} % of the packets duplicated")
        self.link.duplicate(percent)
        time.sleep(seconds)
        self.link.heal()

    def fault_slow(self, seconds: float) -> None:
        kbit = self.rng.choice((64, 128, 256, 512, 1000))
        self.say(f"  {kbit} kbit/s")
        self.link.slow(kbit)
        time.sleep(seconds)
        self.link.heal()

    def fault_netem(self, seconds: float) -> None:
        delay, jitter = self.rng.randint(20, 200), self.rng.randint(5, 100)
        reorder = self.rng.randint(5, 30)
        self.say(f"  {delay} ms ± {jitter} ms, {reorder} % reordered")
        self.link.netem(delay, jitter, reorder)
        time.sleep(seconds)
        self.link.heal()

    def fault_kill(self, seconds: float) -> None:
        self.broker.kill()
        self.broker.start()

    def fault_kill_backlog(self, seconds: float) -> None:
        self.signal_group(clients.CONSUMERS, signal.SIGSTOP)
        time.sleep(seconds)  # confirmed puts pile up
        self.broker.kill()
        self.broker.start()
        self.signal_group(clients.CONSUMERS, signal.SIGCONT)

    def fault_kill_partitioned(self, seconds: float) -> None:
        self.link.partition(Partition())
        self.broker.kill()
        self.broker.start()
        time.sleep(seconds)
        self.link.heal()

    def fault_kill_twice(self, seconds: float) -> None:
        self.broker.kill()
        self.broker.start(wait=False)
        time.sleep(self.rng.uniform(0.05, 0.5))  # still starting: recovery, or about to listen
        self.broker.kill()
        self.broker.start()

    def fault_kill_lossy(self, seconds: float) -> None:
        self.link.loss(20)
        self.broker.kill()
        self.broker.start()
        time.sleep(seconds)
        self.link.heal()

    def fault_term(self, seconds: float) -> None:
        if not self.broker.term(60):
            self.hangs.append("the broker did not stop within 60 s of SIGTERM")
        self.broker.start()

    def fault_term_partitioned(self, seconds: float) -> None:
        self.link.partition(Partition(self.some_clients()))
        self.fault_term(0)
        time.sleep(seconds)
        self.link.heal()

    def fault_pause(self, seconds: float) -> None:
        self.broker.signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.broker.signal(signal.SIGCONT)

    def fault_kill_producer(self, seconds: float) -> None:
        """A producer SIGKILLed inside a call, half the time while its confirmations are
        dropped (so the write may well be stored)."""
        c = self.clients[self.rng.choice(clients.PRODUCERS)]
        blind = self.rng.random() < 0.5
        self.say(f"  {c.role}{', its confirmations dropped' if blind else ''}")
        if blind:
            self.link.partition(Partition((self.link.client_ip(c.slot),), "from-broker"))
        self._wait_for_record(c, "a", seconds)
        self.respawn(c)
        self.link.heal()

    def fault_kill_consumer(self, seconds: float) -> None:
        """A ``get_message`` consumer SIGKILLed while it holds a message (never the plain
        ``get`` one: ``get`` acks before it returns, its death there would be its own loss)."""
        c = self.clients[self.rng.choice(("get_message", "get_message_slow", "aget_message"))]
        self.say(f"  {c.role}")
        self._wait_for_record(c, "d", seconds)
        self.respawn(c)

    def fault_stop_consumer(self, seconds: float) -> None:
        c = self.clients[self.rng.choice(clients.CONSUMERS)]
        self.say(f"  {c.role}")
        c.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        c.proc.send_signal(signal.SIGCONT)

    def _wait_for_record(self, c: Client, kind: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and c.last_record() != kind:
            time.sleep(0.02)


@contextlib.contextmanager
def nemesis(opts: Options) -> Iterator[Run]:
    opts.workdir.mkdir(parents=True, exist_ok=True)
    with Run(opts) as run:
        yield run
