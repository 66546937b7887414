"""/healthz, /readyz and the metrics on one port: what each answers as the process's parts say they are ready."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from services.runtime import free_port
from shared import health


@pytest.fixture
def endpoint(monkeypatch):
    """The health server of a process whose parts the test registers (none to begin with), on a free port."""
    monkeypatch.setattr(health, "_checks", {})
    registry = CollectorRegistry()
    Counter("probes", "a metric of the test's own", registry=registry).inc()
    port = free_port()
    server = health.serve(port, make_wsgi_app(registry), host="127.0.0.1")
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_alive_always_ready_only_when_every_part_is_and_metrics_beside_them(endpoint):
    assert get(f"{endpoint}/healthz") == (200, json.dumps({"status": "alive"}, separators=(",", ":")))
    # nothing registered yet: the process is still starting
    status, body = get(f"{endpoint}/readyz")
    assert status == 503 and json.loads(body) == {"status": "not ready", "reasons": {"process": health.STARTING}}

    connected, listening = False, True
    health.require("bus", lambda: None if connected else "NATS connection lost: reconnecting")
    health.require("http", lambda: None if listening else "stopping")
    status, body = get(f"{endpoint}/readyz")
    assert status == 503 and json.loads(body)["reasons"] == {"bus": "NATS connection lost: reconnecting"}

    connected = True
    assert get(f"{endpoint}/readyz") == (200, '{"status":"ready"}')

    def broken() -> str | None:
        raise RuntimeError("no connection object yet")
    health.require("http", broken)  # a check that fails is a part that is not ready, with what it raised
    status, body = get(f"{endpoint}/readyz")
    assert status == 503 and json.loads(body)["reasons"] == {"http": "RuntimeError: no connection object yet"}
    assert get(f"{endpoint}/healthz")[0] == 200

    for path in ("/metrics", "/"):  # every other path is prometheus_client's, as before
        status, body = get(f"{endpoint}{path}")
        assert status == 200 and "probes_total 1.0" in body
