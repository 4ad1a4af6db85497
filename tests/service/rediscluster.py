"""A real Redis Cluster on loopback for tests: N masters with R replicas each (1 by default),
every node a ``redis-server`` of its own (free ports whose cluster-bus port, +10000, is free
too), built with ``redis-cli --cluster create``; killed and removed afterwards."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> list[int]:
    """``n`` ports in 20000-29999 whose bus ports (+10000) are free as well."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        p = rng.randrange(20000, 30000)
        if p not in ports and _free(p) and _free(p + 10000):
            ports.append(p)
    return ports


@dataclass
class LocalCluster:
    workdir: Path
    masters: int = 3
    replicas: int = 1  # per master
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[: self.masters])

    def _start_node(self, port: int) -> None:
        data = self.workdir / str(port)
        data.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                # what deploy/README.md asks of a production cluster: the shards that have a
                # master keep serving while another has none, and replicas answer reads then
                "--cluster-require-full-coverage",
                "no",
                "--cluster-allow-reads-when-down",
                "yes",
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> LocalCluster:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
        self.ports = cluster_ports((1 + self.replicas) * self.masters)
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait(lambda p=port: redis.Redis(port=p, socket_timeout=0.5).ping(), "start")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()
        return self

    def _wait(self, check: object, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster did not {what}")
            time.sleep(0.05)

    def wait_ok(self) -> None:
        """Every live node reports ``cluster_state:ok`` and every replica has synced."""

        def ok() -> bool:
            for port, proc in self.procs.items():
                if proc.poll() is not None:
                    continue
                node = redis.Redis(port=port, socket_timeout=0.5)
                try:
                    if node.cluster("info")["cluster_state"] != "ok":
                        return False
                    info = node.info("replication")
                    if info["role"] == "slave" and info["master_link_status"] != "up":
                        return False
                finally:
                    node.close()
            return True

        self._wait(ok, "become ok")

    def replica_of(self, port: int) -> int:
        """The port of the replica of the master on ``port``."""
        node = redis.Redis(port=port, socket_timeout=1)
        try:
            return int(node.info("replication")["slave0"]["port"])
        finally:
            node.close()

    def role(self, port: int) -> str:
        node = redis.Redis(port=port, socket_timeout=1)
        try:
            return str(node.info("replication")["role"])
        finally:
            node.close()

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(timeout=10)

    def restart(self, port: int) -> None:
        """Starts the node on ``port`` again, on its own data and cluster config (as its
        supervisor would): it rejoins, as a replica if it was failed over meanwhile."""
        self._start_node(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=2)

    def cleanup(self, prefix: str) -> None:
        """Deletes every key under ``prefix`` (a test's own) on every master."""
        client = self.client()
        try:
            for node in client.get_primaries():
                conn = node.redis_connection
                pattern = prefix.replace("*", r"\*") + "*"
                keys = list(conn.scan_iter(match=pattern, count=1000))
                for k in keys:  # one at a time: a cluster node refuses keys of several slots
                    conn.unlink(k)
        finally:
            client.close()
