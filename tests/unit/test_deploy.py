"""docker-compose.yml and the NATS config agree with the code."""

from pathlib import Path

import yaml

from services.runtime import SERVICES

ROOT = Path(__file__).parents[2]


def test_compose_runs_every_service_against_the_nats_it_starts():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    run = {s["command"][1] for name, s in services.items() if name != "nats"}
    assert run == set(SERVICES)
    for name, service in services.items():
        if name == "nats":
            continue
        assert service["command"][0] == "service"
        assert service["environment"]["CONTINUUM_NATS_URL"] == "nats://nats:4222"
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
    nats = services["nats"]
    assert "4222:4222" in nats["ports"] and nats["healthcheck"]["test"]
    config_mount = next(v for v in nats["volumes"] if v.endswith(":/etc/nats/nats.conf:ro"))
    assert (ROOT / config_mount.split(":")[0]).is_file()


def test_nats_config_enables_jetstream_and_allows_large_bodies_to_be_refused():
    config = (ROOT / "deploy/nats/nats.conf").read_text()
    assert "jetstream {" in config and "port: 4222" in config
    assert "max_payload: 2MB" in config
