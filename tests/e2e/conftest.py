"""Every end-to-end test runs twice: on an open nats-server of its own (v1: no credentials, as an integrator's
server may be), and on the server `continuum up` starts by default (TLS, an account per tenant, a principal for
each site, the services and the operator)."""

from __future__ import annotations

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
