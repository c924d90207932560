"""A real ``redis-server`` for the state tests: started on a free loopback port with no
persistence, stopped afterwards; it can be killed, paused, resumed and restarted on the same
port. Tests that need it skip (saying why) when ``redis-server`` is not installed."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = _free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not ended within 5 s."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port``."""

    def __init__(self, executable: str, directory: str):
        self.executable = executable
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        #: the unix socket it also listens on (``None``: none)
        self.socket: str | None = os.path.join(directory, "redis.sock")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                *(["--unixsocket", self.socket] if self.socket else []),
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start within 10 s")

    def kill(self) -> None:
        """SIGKILL: gone at once, everything it held lost (no persistence)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open and nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def command(self, *words: str) -> bytes:
        """Send one command with a plain socket (not the client under test); the raw reply."""
        payload = f"*{len(words)}\r\n".encode() + b"".join(
            f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(payload)
            time.sleep(0.05)
            return conn.recv(65536)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            _terminate(self.process)
            self.process = None


def running_redis(tmp_path: os.PathLike[str]) -> Iterator[RedisServer]:
    """The body of a ``redis_server`` fixture: a started server, stopped afterwards."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(REDIS_SERVER, os.fspath(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        gc.collect()  # see the note on coredis in test_state_redis.py


class RedisSentinel:
    """One ``redis-server --sentinel`` on 127.0.0.1:``port`` watching ``primary`` as the
    service ``name`` (a quorum of one: enough to name the primary; no failover is tested)."""

    def __init__(self, primary: RedisServer, name: str = "relayrace"):
        self.primary = primary
        self.name = name
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}/{db}"

    def start(self) -> None:
        config = os.path.join(self.primary.directory, f"sentinel-{self.port}.conf")
        with open(config, "w") as f:  # the Sentinel rewrites its file: one of its own
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.primary.directory}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.primary.port} 1\n"
            )
        assert self.primary.executable
        self.process = subprocess.Popen(
            [self.primary.executable, config, "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        question = (
            "*3\r\n$8\r\nSENTINEL\r\n$23\r\nget-master-addr-by-name\r\n"
            f"${len(self.name)}\r\n{self.name}\r\n"
        ).encode()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(question)
                    if str(self.primary.port).encode() in conn.recv(256):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server --sentinel did not name the primary within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None


REDIS_CLI = shutil.which("redis-cli")


class RedisCluster:
    """Three ``redis-server --cluster-enabled yes`` masters on loopback, joined by
    ``redis-cli --cluster create`` (no replicas), no persistence; stopped afterwards."""

    def __init__(self, executable: str, directory: str):
        self.nodes = [RedisServer(executable, directory) for _ in range(3)]
        for node in self.nodes:
            node.port = _cluster_port()  # its bus listens on port + 10000
            node.socket = None  # one directory: no unix sockets to clash

    def url(self, node: int = 0) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[node].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start(["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{node.port}.conf"])
        assert REDIS_CLI is not None
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis cluster did not come up within 10 s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def running_cluster(tmp_path: os.PathLike[str]) -> Iterator[RedisCluster]:
    """The body of a ``redis_cluster`` fixture: three joined nodes, stopped afterwards."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli are not installed (Debian: apt-get install redis-server)")
    cluster = RedisCluster(REDIS_SERVER, os.fspath(tmp_path))
    try:
        cluster.start()  # inside: nodes started before a failure are stopped too
        yield cluster
    finally:
        cluster.stop()
        gc.collect()
