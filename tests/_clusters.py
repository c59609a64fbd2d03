"""Real servers on loopback, started and stopped by the tests: a redis-server or nats-server
of a test's own (crashed and started again), a 3-node NATS JetStream cluster, a Redis
Cluster of 3 masters and 3 replicas, a Redis Sentinel group."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests._services import free_port, skip_or_fail, wait_for_port


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        skip_or_fail(f"{binary} is not installed (Debian: nats-server, redis-server)")
    assert path is not None
    return path


def redis_aof(port: int, directory: Path) -> list[str]:
    """redis-server's arguments for loopback and an append-only file fsynced on every
    write (``appendfsync always``): what it confirmed survives a crash of it."""
    return ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always"]  # fmt: skip


class Scratch:
    """A server of the test's own on a free loopback port, its data in ``directory``;
    ``restart()`` ends it and starts it again on the same port and data."""

    binary = ""
    scheme = ""

    def __init__(self, directory: Path) -> None:
        self.exe = need(self.binary)
        self.port = free_port()
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class ScratchRedis(Scratch):
    """A redis-server with ``redis_aof``: ``restart()`` crashes it (SIGKILL)."""

    binary = "redis-server"
    scheme = "redis"

    def argv(self) -> list[str]:
        return [self.exe, *redis_aof(self.port, self.dir)]


class ScratchNats(Scratch):
    """A nats-server with JetStream on a file store: ``restart()`` stops it cleanly
    (SIGTERM: JetStream syncs its files on a clean stop); ``kill()`` crashes it."""

    binary = "nats-server"
    scheme = "nats"

    def argv(self) -> list[str]:
        return [self.exe, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir)]

    def restart(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self.start()


class Procs:
    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="pigeon-cluster-"))

    def kill(self, i: int) -> None:
        p = self.procs.pop(i)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def close(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class NatsCluster(Procs):
    """Three nats-server processes with JetStream, routed to each other."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.binary = need("nats-server")
        self.ports = [free_port() for _ in range(n)]
        self.routes = [free_port() for _ in range(n)]
        for i in range(n):
            self.start(i)
        for port in self.ports:
            wait_for_port(port)
        self.wait_ready()

    def start(self, i: int) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)
        self.procs[i] = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.ports[i]), "-js",
             "-sd", str(self.dir / f"n{i}"), "--server_name", f"n{i}", "--cluster_name", "pg",
             "--cluster", f"nats://127.0.0.1:{self.routes[i]}", "--routes", routes],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def servers(self, alive_only: bool = False) -> str:
        idx = sorted(self.procs) if alive_only else range(len(self.ports))
        return ",".join(f"127.0.0.1:{self.ports[i]}" for i in idx)

    def _seeds(self) -> list[str]:
        return [f"nats://127.0.0.1:{self.ports[i]}" for i in sorted(self.procs)]

    def url(self, queue: str, **params: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"nats://{self.servers()}/{queue}" + (f"?{query}" if query else "")

    def _run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def wait_ready(self, timeout: float = 30.0) -> None:
        async def ready() -> None:
            import nats

            deadline = time.monotonic() + timeout
            while True:
                try:
                    nc = await nats.connect(servers=self._seeds(), connect_timeout=2)
                    try:
                        await nc.jetstream().account_info()
                        return
                    finally:
                        await nc.close()
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)

        self._run(ready())

    def leader_of(self, stream: str) -> int:
        async def leader() -> int:
            import nats

            nc = await nats.connect(servers=self._seeds(), connect_timeout=2)
            try:
                info = await nc.jetstream().stream_info(stream)
                return int(info.cluster.leader.lstrip("n"))
            finally:
                await nc.close()

        result: int = self._run(leader())
        return result


def cluster_port() -> int:
    """A free port P whose cluster-bus port P + 10000 is free too (and below 65536)."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisCluster(Procs):
    """Six redis-server processes in cluster mode: 3 masters, each with a replica."""

    def __init__(self) -> None:
        super().__init__()
        self.binary = need("redis-server")
        cli = need("redis-cli")
        for attempt in range(3):  # a port taken between its check and the bind: again
            self.ports = [cluster_port() for _ in range(6)]
            for i in range(6):
                self.start(i)
            for port in self.ports:
                wait_for_port(port)
            made = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True, timeout=60,
            )  # fmt: skip
            if made.returncode == 0:
                break
            for i in list(self.procs):
                self.kill(i)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
            if attempt == 2:
                raise RuntimeError(
                    f"redis-cli --cluster create failed 3 times; last: {made.stdout[-500:]!r} "
                    f"{made.stderr[-500:]!r}"
                )
        self.wait_ok()
        self.wait_replicas_synced()

    def wait_replicas_synced(self, timeout: float = 60.0) -> None:
        """Every replica linked to its master with the first sync done: until then a
        put with ``?wait=1`` cannot reach a replica (cluster_state:ok comes sooner)."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = 0
            for port in self.ports:
                with contextlib.suppress(Exception):
                    r = redis.Redis(port=port, socket_timeout=2)
                    try:
                        info = r.info("replication")
                        up += info.get("role") == "slave" and info.get("master_link_status") == "up"
                    finally:
                        r.close()
            if up == len(self.ports) // 2:
                return
            time.sleep(0.3)
        raise TimeoutError("the Redis cluster's replicas did not finish their first sync")

    def start(self, i: int) -> None:
        d = self.dir / f"r{i}"
        d.mkdir(exist_ok=True)
        self.procs[i] = subprocess.Popen(
            [self.binary, "--port", str(self.ports[i]), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
             "--cluster-node-timeout", "2000", "--dir", str(d), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def wait_ok(self, timeout: float = 30.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        alive = [self.ports[i] for i in sorted(self.procs)]
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                r = redis.Redis(port=alive[0], socket_timeout=2)
                try:
                    if r.cluster("info")["cluster_state"] == "ok":
                        return
                finally:
                    r.close()
            time.sleep(0.3)
        raise TimeoutError("the Redis cluster did not reach cluster_state:ok")

    def url(self, queue: str, **params: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])
        return f"redis+cluster://{hosts}/{queue}" + (f"?{query}" if query else "")

    def master_of(self, key: str) -> int:
        import redis

        r = redis.Redis(port=self.ports[sorted(self.procs)[0]], socket_timeout=2)
        try:
            slot = r.cluster("keyslot", key)
            for start, end, master, *_ in r.cluster("slots"):
                if start <= slot <= end:
                    return self.ports.index(int(master[1]))
        finally:
            r.close()
        raise LookupError(key)


class Sentinels(Procs):
    """A master, a replica and three sentinels watching them as ``mymaster``."""

    def __init__(self) -> None:
        super().__init__()
        self.binary = need("redis-server")
        self.data = [free_port(), free_port()]
        self.sentinels = [free_port() for _ in range(3)]
        self.start_data(0, replica_of=None)
        self.start_data(1, replica_of=self.data[0])
        for j, port in enumerate(self.sentinels):
            conf = self.dir / f"sentinel{j}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.data[0]} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 5000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
            self.procs[10 + j] = subprocess.Popen(
                [self.binary, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port in [*self.data, *self.sentinels]:
            wait_for_port(port)
        time.sleep(1.0)

    def start_data(self, i: int, replica_of: int | None) -> None:
        d = self.dir / f"d{i}"
        d.mkdir(exist_ok=True)
        args = [self.binary, *redis_aof(self.data[i], d)]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(self, queue: str, **params: object) -> str:
        params = {"service": "mymaster", **params}
        query = "&".join(f"{k}={v}" for k, v in params.items())
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis+sentinel://{hosts}/{queue}?{query}"
