"""docker-compose.yml and the NATS config agree with the code."""

import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from services.runtime import SERVICES

ROOT = Path(__file__).parents[2]

# where the OpenTelemetry SDK sends each OTLP protocol on a collector (Jaeger's all-in-one listens on both)
OTLP_PORTS = {"http/protobuf": 4318, "grpc": 4317}
JAEGER_ADMIN_PORT = 14269  # all-in-one serves its health at `/` there


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


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


def _nats_conf(key: str) -> int:
    config = (ROOT / "deploy/nats/nats.conf").read_text()
    found = re.search(rf"^{key}:\s*(\d+)\s*$", config, re.MULTILINE)
    assert found, f"no `{key}:` in deploy/nats/nats.conf"
    return int(found.group(1))


def test_compose_runs_every_service_from_the_image_against_the_nats_it_starts():
    compose = _compose()
    services = compose["services"]
    ours = _continuum(services)
    for name, service in services.items():
        assert ("build" in service) != ("image" in service), f"{name}: either built here or an image, not both"
    assert set(services) - set(ours) == {"nats", "jaeger"}
    for name, service in ours.items():
        build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
        dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        assert dockerfile.resolve() == (ROOT / "Dockerfile").resolve(), f"{name}: builds from {dockerfile}"
    assert 'ENTRYPOINT ["continuum"]' in (ROOT / "Dockerfile").read_text()

    from services.cli import app

    cli_commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert "service" in cli_commands
    run = []
    for name, service in ours.items():
        command = service["command"]
        assert command[0] == "service", f"{name}: runs {command}"
        assert command[1] in SERVICES, f"{name}: no service {command[1]!r}"
        assert all(arg.startswith("--") for arg in command[2::2]), f"{name}: {command[2:]} are not `--option value`"
        run.append(command[1])
    assert sorted(run) == sorted(SERVICES), "each service runs in exactly one compose service"

    nats_port = _nats_conf("port")
    nats = services["nats"]
    assert _published(nats).get(nats_port), f"nats does not publish its client port {nats_port}"
    for name, service in ours.items():
        url = urlsplit(_env(service)["CONTINUUM_NATS_URL"])
        assert (url.scheme, url.hostname, url.port) == ("nats", "nats", nats_port), f"{name}: {url.geturl()}"
    assert nats["healthcheck"]["test"]
    assert f":{_nats_conf('http_port')}/" in " ".join(nats["healthcheck"]["test"]), "nats health on its http_port"
    config_mount = next(v for v in nats["volumes"] if v.endswith(":/etc/nats/nats.conf:ro"))
    assert (ROOT / config_mount.split(":")[0]).is_file()
    assert "/etc/nats/nats.conf" in nats["command"]

    # the usage comment at the top matches what is published
    text = (ROOT / "docker-compose.yml").read_text()
    assert f"CONTINUUM_NATS_URL=nats://localhost:{_published(nats)[nats_port]} ./dev sites" in text
    assert f"http://localhost:{_published(services['jaeger'])[16686]}" in text
    assert "docker compose up --build" in text


def test_every_service_waits_for_healthy_nats_and_jaeger_and_reports_its_health():
    services = _compose()["services"]
    for name, service in _continuum(services).items():
        for dependency in ("nats", "jaeger"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy", f"{name} -> {dependency}"
        port = int(_env(service)["CONTINUUM_METRICS_PORT"])
        assert 0 < port < 65536
        check = service["healthcheck"]
        # python:3.11-slim has no curl or wget: the check must run the image's Python
        assert check["test"][:2] == ["CMD", "python"], f"{name}: {check['test']}"
        assert f"localhost:{port}/metrics" in " ".join(check["test"]), f"{name}: health not on metrics port {port}"
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), f"{name}: {sorted(check)}"
        replicas = service.get("deploy", {}).get("replicas", 1)
        if replicas > 1:  # replicas cannot share a container name or a host port
            assert "container_name" not in service and not service.get("ports"), name
    assert services["routing"]["deploy"]["replicas"] == 2


def test_every_service_sends_its_traces_to_jaeger_under_its_own_name():
    services = _compose()["services"]
    jaeger = services["jaeger"]
    names = []
    for name, service in _continuum(services).items():
        env = _env(service)
        assert env["OTEL_SERVICE_NAME"] == f"continuum-{service['command'][1]}", name
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
    assert any(v.endswith(":/data") for v in compose["services"]["billing"]["volumes"]), "the ledger is kept"


def test_nats_config_enables_jetstream_and_allows_large_bodies_to_be_refused():
    config = (ROOT / "deploy/nats/nats.conf").read_text()
    assert "jetstream {" in config and "port: 4222" in config
    assert "max_payload: 2MB" in config
