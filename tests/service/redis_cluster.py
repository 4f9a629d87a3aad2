"""A real 3-master Redis Cluster on loopback ports, started from redis-server and redis-cli
(``--cluster create ... --cluster-replicas 0``) in a temporary directory, and stopped after."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

MASTERS = 3
BUS_OFFSET = 10_000  # a cluster node also listens on port + 10000 (the cluster bus)
START_TIMEOUT_S = 20


class ClusterUnavailable(Exception):
    """The cluster could not be started here (missing tools, no ports): tests skip."""


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports p with p and p + BUS_OFFSET both free (the OS picks no such pairs for us)."""
    chosen: list[int] = []
    candidates = random.Random().sample(range(20_000, 45_000), 500)
    for port in candidates:
        if _bindable(port) and _bindable(port + BUS_OFFSET) and port not in chosen:
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise ClusterUnavailable("no free port pairs for a Redis Cluster")


def _cluster_ok(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


@contextmanager
def redis_cluster() -> Iterator[list[int]]:
    """Start the cluster; yield its masters' ports; stop it (SIGTERM, then SIGKILL)."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            raise ClusterUnavailable(f"{tool} is not installed")
    ports = _free_ports(MASTERS)
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fusionrank-cluster-") as tmp:
        try:
            for port in ports:
                directory = Path(tmp) / str(port)
                directory.mkdir()
                command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
                command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                command += ["--dir", str(directory), "--save", "", "--appendonly", "no"]
                command += ["--logfile", str(directory / "redis.log")]
                processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
            deadline = time.monotonic() + START_TIMEOUT_S
            for port in ports:
                while not redis_answers(f"redis://127.0.0.1:{port}"):
                    if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                        raise ClusterUnavailable(f"redis-server did not start on {ports}")
                    time.sleep(0.05)
            nodes = [f"127.0.0.1:{port}" for port in ports]
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *nodes]
                + ["--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
            )
            if created.returncode != 0:
                raise ClusterUnavailable(f"redis-cli --cluster create failed: {created.stdout}")
            while not all(_cluster_ok(port) for port in ports):
                if time.monotonic() > deadline:
                    raise ClusterUnavailable("the cluster did not reach cluster_state:ok")
                time.sleep(0.1)
            yield ports
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis at ``url`` answers PING within ``timeout_s``."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def delete_prefix(ports: list[int], prefix: str) -> None:
    """Delete every key under ``prefix`` on every master."""
    for port in ports:
        client = redis.Redis(port=port)
        try:
            pipe = client.pipeline(transaction=False)
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                pipe.unlink(key)  # one key a command: the keys of one node span slots
            pipe.execute()
        finally:
            client.close()
