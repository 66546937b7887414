"""The AsyncAPI document of the whole system: every service's broker, built (not connected) from the code.

    .venv/bin/python -m services.asyncapi        (writes docs/asyncapi.yaml, sorted)
"""

from __future__ import annotations

from faststream import FastStream
from faststream.specification import AsyncAPI

from services.runtime import _factories
from shared.bus import Bus
from shared.settings import Settings

Bus.documenting = True  # consumers as FastStream's per-message subscribers, which document their message type
_settings = Settings(nats_url="nats://localhost:4222")
# the gateway speaks HTTP, not NATS: its document is docs/openapi.json (python -m services.gateway.openapi)
_apps = [factory(_settings) for name, factory in _factories().items() if name != "gateway"]

_brokers = [app.broker for app in _apps]
docs = FastStream(_brokers[0], specification=AsyncAPI(
    *_brokers,
    title="Continuum",
    version="1",
    description="A broker for AI compute across Europe's public supercomputers and sovereign GPU clouds. "
                "Subjects, payloads and the event envelope are fixed by docs/CONTRACT.md.",
))


def write(path: str = "docs/asyncapi.yaml") -> None:
    """The document as YAML, its maps sorted: FastStream lists channels in no fixed order, and a regenerated file
    should differ only where the code did."""
    import yaml

    document = yaml.safe_load(docs.schema.to_specification().to_yaml())
    with open(path, "w") as f:
        yaml.safe_dump(document, f, sort_keys=True, allow_unicode=True, width=120)


if __name__ == "__main__":  # python -m services.asyncapi
    write()
