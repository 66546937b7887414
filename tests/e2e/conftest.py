"""Every end-to-end test runs twice: on an open nats-server of its own (v1: no credentials, as an integrator's
server may be), and on the server `continuum up` starts by default (TLS, an account per tenant, a principal for
each site, the services and the operator). The dashboard's tests drive a browser: Debian's chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.runtime import EmbeddedNats


@pytest.fixture(params=["open", "default"])
def nats_server(request, tmp_path):
    """The server the system runs on: the test's own (open), or None: the one `up` starts itself."""
    if request.param == "default":
        yield None
        return
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by the project's script when it is missing (the dashboard's tests drive it
    with Playwright; no browser is downloaded); skipped, with the reason, where it cannot be: not root, no apt."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "browser" / "chromium.sh"
    done = subprocess.run(["bash", str(script)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode == 77:
        pytest.skip(f"no chromium on this machine: {done.stderr.strip()}")
    assert done.returncode == 0, f"deploy/browser/chromium.sh failed: {done.stderr}"
    return done.stdout.strip().splitlines()[-1]
