"""The gateway as its HTTP clients see it, for end-to-end tests: its base URL from the state file `continuum up`
writes, each principal's bearer token (none on an open system, where a request names its tenant), a py-tes
client as workflow engines use one, and Server-Sent Events read as a browser reads them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import tes

from tests.e2e.harness import RunningSystem, connect_when_up


class Http:
    def __init__(self, system: RunningSystem) -> None:
        self.system = system
        self.url = json.loads((system.data_dir / "state.json").read_text())["http"]
        self.tokens = system.data_dir / "auth" / "tokens"

    @property
    def secure(self) -> bool:
        return self.tokens.is_dir()

    def token(self, principal: str) -> str | None:
        return (self.tokens / f"{principal}.token").read_text().strip() if self.secure else None

    def headers(self, principal: str | None) -> dict[str, str]:
        """How `principal` says who it is (None: it does not)."""
        token = self.token(principal) if principal else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client(self, principal: str | None = "operator") -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers(principal), timeout=30.0)

    def tes(self, principal: str) -> tes.HTTPClient:
        return tes.HTTPClient(self.url, token=self.token(principal), timeout=30)

    def tags(self, tenant: str, **more: str) -> dict[str, str]:
        """A task's tags: on an open system they name the tenant (a token says it otherwise)."""
        return {**({} if self.secure else {"continuum.tenant": tenant}), **more}

    def spec(self, tenant: str, **fields) -> dict:
        return {"tenant": tenant, "command": ["true"], "resources": {"gpus": 1, "gpu_type": "H100"}, **fields}


async def gateway_when_up(system: RunningSystem, timeout: float = 60.0) -> Http:
    """The gateway once the system is up and it says it is ready (connected, its index following)."""
    nc = await connect_when_up(system, timeout)
    await nc.close()
    http = Http(system)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=http.url, timeout=2.0) as client:
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return http
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not become ready"
            await asyncio.sleep(0.1)


async def sse(client: httpx.AsyncClient, path: str = "/api/v1/events", **headers: str
              ) -> AsyncIterator[tuple[int, dict]]:
    """Server-Sent Events as (id, CloudEvent), as they come; comments (keep-alives) skipped."""
    async with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(30.0, read=60.0)) as response:
        assert response.status_code == 200, await response.aread()
        event_id, data = None, []
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                assert event_id is not None
                yield event_id, json.loads("\n".join(data))
                event_id, data = None, []


async def until(check, timeout: float, what: str, every: float = 0.1):
    """Ask again until `check()` gives something (a condition the system reaches, not a time to wait)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(every)
