"""Network namespaces and the faults made on their links, for the partition and nemesis tests.

- ``Netns``: a namespace of our own (``ip netns add``), deleted at ``close()``.
- ``Link``: a namespace joined to the host by a veth pair on a /24 of 10.x.y.0 that no route
  of this machine uses. The broker listens on ``broker_ip`` inside it; client processes on
  the host bind ``client_ip(i)`` (extra addresses of the host's end of the veth), so their
  packets can be told apart and any subset of clients cut off.
- The faults, one set at a time (each method, then ``heal``): nftables drops on the
  namespace's end of the veth (``partition``, ``loss``), nftables ``dup`` on the egress of
  both ends (``duplicate``), a token bucket on both ends (``slow``, ``tc tbf``), and
  delay/jitter/reordering with ``tc netem`` where the kernel has ``sch_netem``
  (``has_netem`` probes it).
- ``drop_port_script``: the in-namespace form ``_partition.py`` uses, where a broker and its
  clients share the namespace's loopback and a port tells them apart.

Safety: nothing may reach a 10.x address outside this machine. While the link exists its
/24 is routed to the veth; an ``unreachable`` route for the same /24 (a higher metric) is
added first and removed last, so a client left over after the namespace is gone gets "no
route to host", never the default route.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass

TOOLS = ("ip", "nft")
TABLE = "pigeon_nemesis"  # netdev table on the namespace's end: drops
DUP_TABLE = "pigeon_nemesis_dup"  # netdev table on each end of the veth: duplicates
_SAFETY_METRIC = 4242
_DUP_MARK = 0x70  # a duplicate carries it, so it is not duplicated again
_ROUTE_TYPES = frozenset(
    ("unicast", "unreachable", "blackhole", "prohibit", "local", "broadcast", "throw", "nat")
)


def missing_tools(*tools: str) -> list[str]:
    """The command-line tools of ``tools`` (default: ip and nft) this machine lacks."""
    return [t for t in (tools or TOOLS) if shutil.which(t) is None]


def require_netns(*tools: str) -> None:
    """Skip a test (fail it under CI) unless it runs as root with ``tools`` at hand."""
    from tests._services import skip_or_fail

    missing = missing_tools(*tools)
    if missing or os.geteuid() != 0:
        skip_or_fail(
            f"a network-namespace test needs root and {', '.join(missing or tools or TOOLS)} "
            "(Debian: iproute2, nftables); .ci/run installs them"
        )


def run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


class Netns:
    """A network namespace of our own; ``close()`` deletes it (and every veth end in it)."""

    def __init__(self, prefix: str = "pigeon") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        run("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, stdin: str | None = None, check: bool = True) -> str:
        return run(*self.argv(*argv), stdin=stdin, check=check)

    def nft(self, script: str) -> None:
        """Apply an nft script inside the namespace, as one transaction."""
        self.run("nft", "-f", "-", stdin=script)

    def close(self) -> None:
        run("ip", "netns", "delete", self.name, check=False)


def drop_port_script(port: int, table: str = TABLE) -> str:
    """Every TCP segment to or from ``port`` dropped, both ways: a pulled cable, no FIN
    and no RST (for the namespace's own loopback, where a port tells the sides apart)."""
    rules = f"tcp sport {port} drop; tcp dport {port} drop"
    return (
        f"table inet {table} {{\n"
        f"  chain input {{ type filter hook input priority 0; {rules}; }}\n"
        f"  chain output {{ type filter hook output priority 0; {rules}; }}\n"
        "}\n"
    )


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = []
    for line in run("ip", "-4", "route", "show", "table", "all").splitlines():
        words = line.split()
        if words and words[0] in _ROUTE_TYPES:
            words = words[1:]
        if words and words[0][0].isdigit():
            used.append(ipaddress.ip_network(words[0], strict=False))
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(200, 255)}.{rng.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for a test link")


@dataclass(frozen=True)
class Partition:
    """Drop the packets of ``clients`` (host-side addresses; all when None), in ``direction``:
    ``both``, ``to-broker`` (requests vanish) or ``from-broker`` (replies vanish)."""

    clients: tuple[str, ...] | None = None
    direction: str = "both"


class Link:
    """A namespace for the broker, joined to the host by a veth pair.

    ``clients``: how many host-side addresses to give out (``client_ip(0..clients-1)``).
    """

    def __init__(self, clients: int = 16, rng: random.Random | None = None) -> None:
        self.ns = Netns("pigeon-nemesis")
        tag = self.ns.name[-8:]
        self.host_dev, self.ns_dev = f"pgh{tag}", f"pgn{tag}"
        self.net = _free_subnet(rng or random.Random())
        hosts = list(self.net.hosts())
        self.host_ip, self.broker_ip = str(hosts[0]), str(hosts[1])
        self._clients = [str(h) for h in hosts[10 : 10 + clients]]
        self._routed = False
        self._host_dup = False
        try:
            run("ip", "route", "add", "unreachable", str(self.net), "metric", str(_SAFETY_METRIC))
            self._routed = True
            run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev,
                "netns", self.ns.name)  # fmt: skip
            for ip in [self.host_ip, *self._clients]:
                run("ip", "addr", "add", f"{ip}/24", "dev", self.host_dev)
            run("ip", "link", "set", self.host_dev, "up")
            self.ns.run("ip", "addr", "add", f"{self.broker_ip}/24", "dev", self.ns_dev)
            self.ns.run("ip", "link", "set", self.ns_dev, "up")
        except BaseException:
            self.close()
            raise

    def client_ip(self, i: int) -> str:
        return self._clients[i % len(self._clients)]

    # --- the faults ----------------------------------------------------------------------

    def partition(self, p: Partition) -> None:
        addrs = "" if p.clients is None else "{ " + ", ".join(p.clients) + " }"
        chains = []
        if p.direction in ("both", "to-broker"):
            chains.append(("ingress", f"ip saddr {addrs} drop" if addrs else "drop"))
        if p.direction in ("both", "from-broker"):
            chains.append(("egress", f"ip daddr {addrs} drop" if addrs else "drop"))
        self._drops(chains)

    def loss(self, percent: int) -> None:
        """Each packet, either way, dropped with probability ``percent`` %."""
        rule = f"numgen random mod 100 < {percent} drop"
        self._drops([("ingress", rule), ("egress", rule)])

    def duplicate(self, percent: int) -> None:
        """Each packet, either way, sent twice with probability ``percent`` %: a duplicate
        is made on the egress of the sending end (a netdev table on each end; the copy
        carries a mark so it is not copied again)."""
        for dev, in_ns in ((self.ns_dev, True), (self.host_dev, False)):
            script = (
                f"table netdev {DUP_TABLE}_{dev} {{\n"
                f'  chain egress {{ type filter hook egress device "{dev}" priority 0;\n'
                f"    meta mark {_DUP_MARK} return\n"
                f"    numgen random mod 100 < {percent} meta mark set {_DUP_MARK} "
                f'dup to "{dev}" meta mark set 0\n'
                "  }\n}\n"
            )
            if in_ns:
                self.ns.nft(script)
            else:
                self._host_dup = True
                run("nft", "-f", "-", stdin=script)

    def slow(self, kbit: int) -> None:
        """Both ways through a token bucket of ``kbit`` kbit/s (``tc tbf``), 500 ms queue."""
        burst = max(1600, kbit * 1000 // 8 // 50)  # bytes: 20 ms at the rate, at least a packet
        args = ("root", "tbf", "rate", f"{kbit}kbit", "burst", str(burst), "latency", "500ms")
        self._tc_both(*args)

    def netem(self, delay_ms: int, jitter_ms: int, reorder_percent: int) -> None:
        """Delay with jitter and reordering both ways (``tc netem``; see ``has_netem``)."""
        args = ("root", "netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms",
                "reorder", f"{100 - reorder_percent}%", "50%")  # fmt: skip
        self._tc_both(*args)

    def has_netem(self) -> bool:
        """Whether ``tc netem`` works here (the kernel may lack ``sch_netem``)."""
        if missing_tools("tc"):
            return False
        made = subprocess.run(
            self.ns.argv("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if made.returncode != 0:
            return False
        self.ns.run("tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return True

    def heal(self) -> None:
        """Undo every fault: no drops, no duplicates, no queueing discipline."""
        self.ns.run("nft", "delete", "table", "netdev", TABLE, check=False)
        self.ns.run("nft", "delete", "table", "netdev", f"{DUP_TABLE}_{self.ns_dev}", check=False)
        if self._host_dup:
            run("nft", "delete", "table", "netdev", f"{DUP_TABLE}_{self.host_dev}", check=False)
            self._host_dup = False
        self.ns.run("tc", "qdisc", "del", "dev", self.ns_dev, "root", check=False)
        run("tc", "qdisc", "del", "dev", self.host_dev, "root", check=False)

    def _drops(self, chains: list[tuple[str, str]]) -> None:
        """Drops on the namespace's end of the veth, at the device (netdev ingress and
        egress hooks): no layer above sees them, as on a wire - a drop in the ``output``
        hook would fail the sender's system call with EPERM instead."""
        dev = self.ns_dev
        body = "".join(
            f'  chain {hook} {{ type filter hook {hook} device "{dev}" priority 0; {rule}; }}\n'
            for hook, rule in chains
        )
        # declare-delete-add: "replace the table" as one transaction, whether it exists or not
        self.ns.nft(f"table netdev {TABLE}\ndelete table netdev {TABLE}\n"
                    f"table netdev {TABLE} {{\n{body}}}\n")  # fmt: skip

    def _tc_both(self, *args: str) -> None:
        self.ns.run("tc", "qdisc", "replace", "dev", self.ns_dev, *args)
        run("tc", "qdisc", "replace", "dev", self.host_dev, *args)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.heal()
        self.ns.close()  # takes the veth pair with it
        run("ip", "link", "delete", self.host_dev, check=False)  # if the move had failed
        if self._routed:
            run("ip", "route", "del", "unreachable", str(self.net), "metric",
                str(_SAFETY_METRIC), check=False)  # fmt: skip
            self._routed = False
