"""The gateway fuzzed from its own OpenAPI document by schemathesis (its CLI, as an integrator would run it):
whatever it sends (wrong types, odd strings, huge numbers, missing fields, bad tokens), no answer is a 500."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import start_system
from tests.e2e.http import gateway_when_up

pytestmark = pytest.mark.e2e


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path, "http_sites.yaml", "http_tenants.yaml")


async def test_no_request_schemathesis_makes_gets_a_server_error(system, tmp_path):
    http = await gateway_when_up(system)
    token = http.token("tenant-lab")
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{http.url}/openapi.json",
               "--checks", "not_a_server_error", "--max-examples", "20", "--max-time", "45", "--seed", "1",
               "--workers", "1", "--request-timeout", "10", "--no-color", "--generation-database", "none",
               "--report-dir", str(tmp_path / "report"),
               # a live event stream never ends: its answers (and its 4xx) are the HTTP tests'
               "--exclude-path", "/api/v1/events"]
    if token:
        command += ["--header", f"Authorization: Bearer {token}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    report = result.stdout[-6000:]
    if token:
        assert token not in result.stdout + result.stderr, "schemathesis printed the token"
    assert result.returncode == 0, report
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert generated and int(generated[1]) == int(generated[2]) > 200, report
