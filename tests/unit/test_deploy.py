"""docker-compose.yml (its two profiles: one NATS server, or the three of deploy/nats/cluster/), the cluster's
configuration files and the NATS configuration `continuum auth init` writes agree with the code."""

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from services.runtime import SERVICES
from shared import health

ROOT = Path(__file__).parents[2]

# where the OpenTelemetry SDK sends each OTLP protocol on a collector (Jaeger's all-in-one listens on both)
OTLP_PORTS = {"http/protobuf": 4318, "grpc": 4317}
JAEGER_ADMIN_PORT = 14269  # all-in-one serves its health at `/` there


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# the profile `docker compose up` runs without --profile: COMPOSE_PROFILES in .env, which compose reads
DEFAULT_PROFILE = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
                       if line.strip() and not line.startswith("#"))["COMPOSE_PROFILES"]
PROFILES = ("single", "cluster")
# each profile's NATS servers (compose services)
NATS_SERVERS = {"single": ["nats"], "cluster": ["nats-1", "nats-2", "nats-3"]}


def _services(profile: str) -> dict:
    """What `docker compose --profile PROFILE up` runs: the services of no profile, and those of PROFILE."""
    return {name: s for name, s in _compose()["services"].items()
            if not s.get("profiles") or profile in s["profiles"]}


def _continuum(services: dict) -> dict:
    """The containers built from this repository's Dockerfile: Continuum's own services."""
    return {name: s for name, s in services.items() if "build" in s}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # compose also allows ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return env


def _published(service: dict) -> dict[int, int]:
    """Container port -> host port, from `ports:` entries like "4222:4222" or "127.0.0.1:4318:4318/tcp"."""
    published = {}
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        published[int(parts[-1])] = int(parts[-2])
    return published


def _option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def _nats_option(flag: str) -> str:
    """A command-line option of the single nats container (the rest of its configuration is what `auth` writes)."""
    option = _option(_compose()["services"]["nats"]["command"], flag)
    assert option is not None, f"nats runs without {flag}"
    return option


def _nats_ports(profile: str, name: str) -> tuple[int, int]:
    """A NATS container's client and monitoring ports: its command's flags, else its configuration file's."""
    command = _services(profile)[name]["command"]
    client, monitor = _option(command, "-p"), _option(command, "-m")
    if client and monitor:
        return int(client), int(monitor)
    server = _cluster_servers()[name]
    return int(client or server["port"]), int(monitor or server["http_port"])


def _running(ours: dict) -> dict:
    """Continuum's long-running containers: all but the one that writes the credentials."""
    return {name: s for name, s in ours.items() if s["command"][0] != "auth"}


def test_docker_compose_up_runs_the_single_server_profile_as_before():
    assert DEFAULT_PROFILE == "single"
    assert set(NATS_SERVERS) == set(PROFILES)
    every = _compose()["services"]
    for name, service in every.items():
        profiles = service.get("profiles", [])
        assert set(profiles) <= set(PROFILES), f"{name}: profiles {profiles}"
        assert len(profiles) <= 1, f"{name}: in one profile or in all, not some: the profiles run one at a time"
    shared = [name for name, s in every.items() if not s.get("profiles")]
    assert shared == ["jaeger"], "only Jaeger serves both profiles"


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_runs_every_service_from_the_image_against_the_nats_it_starts(profile):
    services = _services(profile)
    ours = _continuum(services)
    for name, service in services.items():
        assert ("build" in service) != ("image" in service), f"{name}: either built here or an image, not both"
    assert set(services) - set(ours) == {*NATS_SERVERS[profile], "jaeger"}
    for name, service in ours.items():
        build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
        dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        assert dockerfile.resolve() == (ROOT / "Dockerfile").resolve(), f"{name}: builds from {dockerfile}"
    assert 'ENTRYPOINT ["continuum"]' in (ROOT / "Dockerfile").read_text()

    from services.cli import app

    cli_commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert "service" in cli_commands
    run, agents = [], {}
    for name, service in _running(ours).items():
        command = service["command"]
        assert command[0] == "service", f"{name}: runs {command}"
        assert command[1] in SERVICES, f"{name}: no service {command[1]!r}"
        assert all(arg.startswith("--") for arg in command[2::2]), f"{name}: {command[2:]} are not `--option value`"
        run.append(command[1])
        if command[1] == "agent":
            agents[command[command.index("--site") + 1]] = _env(service)["CONTINUUM_NATS_CREDS"]
    assert sorted(set(run)) == sorted(SERVICES), "every service runs"
    others = [s for s in run if s != "agent"]
    assert len(others) == len(set(others)), "one container a service, but for the agents"
    # an agent a site of the built-in catalog, each as that site's principal
    from shared.contracts.catalog import Catalog

    assert agents == {site: f"/auth/creds/site-{site}.nk" for site in Catalog.load().sites}

    # every service is given every server of the profile, on its client port, each published on the host
    expected = []
    for nats in NATS_SERVERS[profile]:
        client, monitor = _nats_ports(profile, nats)
        assert _published(services[nats]).get(client), f"{nats} does not publish its client port {client}"
        expected.append(("tls", nats, client))
        assert services[nats]["healthcheck"]["test"]
        assert f":{monitor}/healthz" in " ".join(services[nats]["healthcheck"]["test"]), f"{nats}: health"
    for name, service in _running(ours).items():
        urls = [urlsplit(url) for url in _env(service)["CONTINUUM_NATS_URL"].split(",")]
        assert [(u.scheme, u.hostname, u.port) for u in urls] == expected, f"{name}: {urls}"

    # the usage comment at the top matches what is published
    text = (ROOT / "docker-compose.yml").read_text()
    host = ",".join(f"tls://localhost:{_published(services[n])[_nats_ports(profile, n)[0]]}"
                    for n in NATS_SERVERS[profile])
    assert f"CONTINUUM_NATS_URL={host} ./dev sites" in text
    assert f"http://localhost:{_published(services['jaeger'])[16686]}" in text
    assert "docker compose up --build" in text and "docker compose --profile cluster up --build" in text


def test_nats_runs_with_the_configuration_and_credentials_auth_init_writes():
    services = _services("single")
    auth, nats = services["auth"], services["nats"]
    out = auth["command"][auth["command"].index("--out") + 1]
    assert auth["command"][:2] == ["auth", "init"] and auth["restart"] == "no"
    # the server certificate names the host the services reach NATS by
    assert auth["command"][auth["command"].index("--host") + 1] == "nats"
    assert nats["depends_on"]["auth"]["condition"] == "service_completed_successfully"
    assert _nats_option("-c") == f"{out}/nats.conf"
    assert f"auth:{out}:ro" in nats["volumes"] and f"auth:{out}" in auth["volumes"]
    for name, service in _running(_continuum(services)).items():
        env = _env(service)
        assert f"auth:{out}:ro" in service["volumes"], f"{name}: no credentials mounted"
        assert env["CONTINUUM_NATS_CA"] == f"{out}/tls/ca.pem"
        assert env["CONTINUUM_NATS_CREDS"].startswith(f"{out}/creds/")
        assert env["CONTINUUM_NATS_CREDS"].endswith(("/services.nk", "/site-" + service["command"][-1] + ".nk"))
        assert "CONTINUUM_STREAM_REPLICAS" not in env, f"{name}: a server alone keeps one copy, as the code decides"


def test_the_cluster_runs_deploy_nats_cluster_with_auth_inits_files_beside_each_configuration():
    """Each server runs its own file of deploy/nats/cluster/, which includes `auth/` from beside it: the volume
    auth-cluster writes is mounted there, at the very path `auth init` wrote (nats.conf names its TLS files by
    absolute path); the certificate names the three servers; the routes of each file name the other two."""
    services = _services("cluster")
    auth = services["auth-cluster"]
    out = _option(auth["command"], "--out")
    assert auth["command"][:2] == ["auth", "init"] and auth["restart"] == "no"
    assert f"auth-cluster:{out}" in auth["volumes"]
    hosts = [auth["command"][i + 1] for i, arg in enumerate(auth["command"]) if arg == "--host"]
    assert sorted(hosts) == NATS_SERVERS["cluster"], "the certificate names every server"
    configs = _cluster_servers()
    assert sorted(configs) == NATS_SERVERS["cluster"], "a server of deploy/nats/cluster a container"
    stores = set()
    for name in NATS_SERVERS["cluster"]:
        nats = services[name]
        config = _option(nats["command"], "-c")
        assert config and Path(config).name == configs[name]["file"], f"{name} runs {config}"
        assert f"./deploy/nats/cluster/{configs[name]['file']}:{config}:ro" in nats["volumes"]
        assert f"auth-cluster:{Path(config).parent / 'auth'}:ro" in nats["volumes"], f"{name}: auth/ beside its file"
        assert str(Path(config).parent / "auth") == out, f"{name}: auth/ where auth-cluster wrote it"
        assert nats["depends_on"]["auth-cluster"]["condition"] == "service_completed_successfully"
        assert {r.hostname for r in configs[name]["routes"]} == set(NATS_SERVERS["cluster"]) - {name}, \
            f"{name} routes to the others by their compose names"
        store = _option(nats["command"], "-sd")
        volume = next(v.split(":")[0] for v in nats["volumes"] if v.split(":")[1] == store)
        stores.add(volume)
    assert len(stores) == 3, "each server its own JetStream store"
    for name, service in _running(_continuum(services)).items():
        env = _env(service)
        assert "auth-cluster:/auth:ro" in service["volumes"], f"{name}: the cluster's credentials"
        assert env["CONTINUUM_NATS_CA"] == "/auth/tls/ca.pem" and env["CONTINUUM_NATS_CREDS"].startswith("/auth/creds/")
        assert env["CONTINUUM_STREAM_REPLICAS"] == "3", f"{name}: every stream and bucket on the three servers"
    # the two profiles keep apart what they store
    single = {v.split(":")[0] for s in _services("single").values() for v in s.get("volumes", [])}
    cluster = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert not {v for v in single & cluster if not v.startswith(".")}, "no volume shared by the two profiles"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_service_waits_for_healthy_nats_and_jaeger_and_reports_its_health(profile):
    services = _services(profile)
    for name, service in _running(_continuum(services)).items():
        for dependency in (*NATS_SERVERS[profile], "jaeger"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy", f"{name} -> {dependency}"
        assert set(service["depends_on"]) == {*NATS_SERVERS[profile], "jaeger"}, name
        port = int(_env(service)["CONTINUUM_METRICS_PORT"])
        assert 0 < port < 65536
        check = service["healthcheck"]
        # python:3.11-slim has no curl or wget: the check must run the image's Python
        assert check["test"][:2] == ["CMD", "python"], f"{name}: {check['test']}"
        # healthy when ready (connected, consumers bound), as the service says beside its metrics
        assert f"localhost:{port}{health.READYZ}" in " ".join(check["test"]), f"{name}: health not {health.READYZ}"
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), f"{name}: {sorted(check)}"
        replicas = service.get("deploy", {}).get("replicas", 1)
        if replicas > 1:  # replicas cannot share a container name or a host port
            assert "container_name" not in service and not service.get("ports"), name
        if service["command"][1] == "routing":
            assert replicas == 2, f"{name}: routing runs two replicas"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_service_sends_its_traces_to_jaeger_under_its_own_name(profile):
    services = _services(profile)
    jaeger = services["jaeger"]
    names = []
    for name, service in _running(_continuum(services)).items():
        env = _env(service)
        assert env["OTEL_SERVICE_NAME"] == f"continuum-{service['command'][1]}", name
        if service["command"][1] != "agent":  # every site's agent is `continuum-agent`, its site an attribute
            names.append(env["OTEL_SERVICE_NAME"])
        protocol = env["OTEL_EXPORTER_OTLP_PROTOCOL"]
        assert protocol in OTLP_PORTS, f"{name}: OTLP protocol {protocol!r}"
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.scheme == "http" and endpoint.hostname == "jaeger", f"{name}: {endpoint.geturl()}"
        assert endpoint.port == OTLP_PORTS[protocol], f"{name}: {protocol} goes to {OTLP_PORTS[protocol]}"
        assert endpoint.port in _published(jaeger), f"{name}: jaeger does not publish {endpoint.port}"
    assert len(names) == len(set(names)), f"service names repeat: {sorted(names)}"


def test_jaeger_receives_otlp_and_reports_its_health():
    jaeger = _compose()["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert _env(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {16686, *OTLP_PORTS.values()} <= set(_published(jaeger))
    check = jaeger["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
    assert str(JAEGER_ADMIN_PORT) in " ".join(check["test"]), "jaeger's health is on its admin port"
    assert {"interval", "timeout", "retries"} <= set(check)


def test_named_volumes_are_declared():
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
            elif source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: mounts {source}, which is not in the repository"
    for profile in PROFILES:
        billing = next(s for s in _services(profile).values() if s.get("command", [""])[:2] == ["service", "billing"])
        assert any(v.endswith(":/data") for v in billing["volumes"]), f"{profile}: the ledger is kept"


def test_the_generated_configuration_is_one_nats_server_runs(tmp_path):
    """What compose and `continuum up` run: the server accepts it and listens with TLS."""
    from services.auth import init
    from services.runtime import EmbeddedNats
    from shared.contracts.catalog import Catalog

    init(tmp_path / "auth", Catalog.load(), ["nats"])
    config = (tmp_path / "auth" / "nats.conf").read_text()
    assert '"sync_interval": "always"' in config and "max_payload: 2MB" in config
    server = EmbeddedNats(tmp_path / "store", config=tmp_path / "auth" / "nats.conf").start()
    try:
        assert server.url.startswith("tls://")
    finally:
        server.stop()


CLUSTER_CONFIGS = ROOT / "deploy" / "nats" / "cluster"
ROUTE_PORT = 6222


def _nats_conf(path: Path) -> str:
    """A nats-server configuration file without its comments."""
    return "\n".join(line.split("#", 1)[0].rstrip() for line in path.read_text().splitlines())


def _one(pattern: str, text: str, where: str) -> str:
    found = re.search(pattern, text, re.M | re.S)
    assert found, f"{where}: nothing like {pattern!r}"
    return found.group(1)


def _cluster_servers() -> dict[str, dict]:
    """deploy/nats/cluster/'s servers by name: their routes, whether they include what `auth init` writes, and the
    client, monitoring and route ports."""
    servers = {}
    for path in sorted(CLUSTER_CONFIGS.glob("nats-*.conf")):
        text = _nats_conf(path)
        block = _one(r"^cluster \{(.*?)^\}", text, path.name)
        servers[_one(r"^server_name: (\S+)$", text, path.name)] = {
            "file": path.name,
            "routes": [urlsplit(route) for route in _one(r"routes: \[(.*?)\]", block, path.name).split()],
            "cluster": _one(r"^\s*name: (\S+)$", block, path.name),
            "listen": _one(r"^\s*listen: (\S+)$", block, path.name),
            "includes": re.findall(r"^include (\S+)$", text, re.M),
            "cluster_includes": re.findall(r"^\s+include (\S+)$", block, re.M),
            "port": int(_one(r"^port: (\d+)$", text, path.name)),
            "http_port": int(_one(r"^http_port: (\d+)$", text, path.name)),
            "jetstream": re.search(r"^jetstream", text, re.M) is not None,
        }
    return servers


def test_each_server_of_the_cluster_routes_to_the_others_with_auth_inits_accounts_and_tls():
    servers = _cluster_servers()
    assert sorted(servers) == ["nats-1", "nats-2", "nats-3"]
    assert [s["file"] for s in servers.values()] == [f"{name}.conf" for name in servers], "a file a server"
    for name, server in servers.items():
        others = set(servers) - {name}
        assert {(r.scheme, r.hostname, r.port) for r in server["routes"]} == {
            ("nats-route", other, ROUTE_PORT) for other in others}, f"{name}: routes to the other two"
        assert server["cluster"] == "continuum", f"{name}: one named cluster"
        assert server["listen"].endswith(f":{ROUTE_PORT}"), f"{name}: listens for routes on {ROUTE_PORT}"
        # accounts, TLS and JetStream's sync_interval as `auth init` writes them, beside the file
        assert server["includes"] == ["auth/nats.conf"], name
        assert server["cluster_includes"] == ["auth/cluster-tls.conf"], f"{name}: TLS on the routes"
        assert not server["jetstream"], f"{name}: a jetstream block of its own would replace auth's (sync_interval)"
        assert (server["port"], server["http_port"]) == (4222, 8222), name


def test_auth_init_writes_the_tls_of_the_routes_with_a_certificate_for_both_ends(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from services.auth import init
    from shared.contracts.catalog import Catalog

    out = tmp_path / "auth"
    init(out, Catalog.load(), ["nats-1", "nats-2", "nats-3"])
    tls = _nats_conf(out / "cluster-tls.conf")
    for file in ("server.pem", "server-key.pem", "ca.pem"):
        assert f'"{out.resolve() / "tls" / file}"' in tls
    assert '"verify": true' in tls, "a route must show a certificate the CA signed"
    cert = x509.load_pem_x509_certificate((out / "tls" / "server.pem").read_bytes())
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    # each server dials the others on the routes: its certificate is a client's there
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"nats-1", "nats-2", "nats-3", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert init(out, Catalog.load(), ["nats-1", "nats-2", "nats-3"]).certificate == "kept"


def test_a_server_certificate_from_before_clusters_is_issued_again_for_both_ends(tmp_path, monkeypatch):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    import services.auth as auth
    from shared.contracts.catalog import Catalog

    monkeypatch.setattr(auth, "SERVER_USAGES", (ExtendedKeyUsageOID.SERVER_AUTH,))  # what `auth init` issued then
    auth.init(tmp_path / "auth", Catalog.load(), ["nats"])
    monkeypatch.undo()
    assert auth.init(tmp_path / "auth", Catalog.load(), ["nats"]).certificate == "issued"
