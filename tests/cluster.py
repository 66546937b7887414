"""A three-server NATS cluster on loopback, run from deploy/nats/cluster/'s configuration files as they ship, with
the accounts and TLS `continuum auth init` writes beside them: the addresses alone are given as flags (free ports on
127.0.0.1 rather than nats-N:4222), which nats-server takes over the file's."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from services.auth import SERVICES_PRINCIPAL, credentials
from services.auth import init as auth_init
from services.runtime import nats_server_binary, terminate, wait_for_port
from shared.contracts.catalog import Catalog
from shared.settings import Settings

CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "cluster"
T = TypeVar("T")


def quiet_port() -> int:
    """A free port below Linux's ephemeral range (32768 and up). A port the kernel hands out (bind to 0) is one
    it may hand again, a moment later, to a connection one of the servers dials out: nine ports chosen before
    three servers start, each dialing the others, collided so ("address already in use")."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class ClusterServer:
    name: str  # its server_name in its configuration file: nats-1, nats-2, nats-3
    config: Path
    store: Path
    port: int = field(default_factory=quiet_port)
    route_port: int = field(default_factory=quiet_port)
    monitor_port: int = field(default_factory=quiet_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LoopbackCluster:
    root: Path
    servers: dict[str, ClusterServer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the shipped files and, beside them as they expect it, `auth/` for the built-in catalog
        for config in sorted(CONFIGS.glob("nats-*.conf")):
            shutil.copy(config, self.root / config.name)
            name = config.stem
            self.servers[name] = ClusterServer(name, self.root / config.name, self.root / f"store-{name}")
        auth_init(self.auth, Catalog.load())

    @property
    def auth(self) -> Path:
        return self.root / "auth"

    @property
    def url(self) -> str:
        """CONTINUUM_NATS_URL for the whole cluster."""
        return ",".join(s.url for s in self.servers.values())

    def settings(self, **overrides) -> Settings:
        """A service's settings on this cluster, as the `services` principal."""
        given = {"nats_url": self.url, "nats_creds": credentials(self.auth, SERVICES_PRINCIPAL),
                 "nats_ca": self.auth / "tls" / "ca.pem", "data_dir": self.root / "data"}
        return Settings(**given | overrides)

    def start(self, name: str | None = None) -> None:
        """Every server (or one, again, on its store): each routes to the others as its file says, here on
        their loopback ports."""
        for server in [self.servers[name]] if name else self.servers.values():
            routes = ",".join(f"nats-route://127.0.0.1:{other.route_port}"
                              for other in self.servers.values() if other is not server)
            server.store.mkdir(exist_ok=True)
            with open(self.root / f"{server.name}.log", "ab") as log:
                server.process = subprocess.Popen(
                    [nats_server_binary(), "-c", str(server.config), "-a", "127.0.0.1", "-p", str(server.port),
                     "-m", str(server.monitor_port), "--cluster", f"nats://127.0.0.1:{server.route_port}",
                     "--routes", routes, "-sd", str(server.store)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        for server in [self.servers[name]] if name else self.servers.values():
            assert server.process is not None
            wait_for_port(server.port, 15.0, server.process)

    async def monitor(self, name: str, endpoint: str) -> dict:
        """What a server's monitoring says at `endpoint` (varz, routez, ...)."""
        def read() -> dict:
            url = f"http://127.0.0.1:{self.servers[name].monitor_port}/{endpoint}"
            with urllib.request.urlopen(url, timeout=2) as reply:
                return json.load(reply)
        return await asyncio.to_thread(read)

    async def routed(self) -> bool:
        """Whether every server running is routed to every other: each advertises the client URLs of all (its
        monitoring's /varz). Routes can take seconds to form after the servers listen (each dials the others, and
        retries those not listening yet)."""
        running = [s.name for s in self.servers.values() if s.alive]
        varz = await asyncio.gather(*(self.monitor(name, "varz") for name in running))
        return all(len(v.get("connect_urls") or ()) == len(running) for v in varz)

    def kill(self, name: str) -> None:
        """kill -9: no goodbye to the clients or the other servers."""
        process = self.servers[name].process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for server in self.servers.values():
            if server.alive:
                assert server.process is not None
                terminate(server.process)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """What `check` returns once it returns something true without raising: asked again every 50 ms (a cluster
    says when it has a leader only when asked), for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = await check()
            if result:
                return result
            last = result
        except Exception as e:  # not yet: a server away, no leader elected, a request that timed out
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.05)
