"""The gateway's OpenAPI document, built from the code (no server, no bus) and committed.

    .venv/bin/python -m services.gateway.openapi        (writes docs/openapi.json)
"""

from __future__ import annotations

import json

from services.gateway.app import create_app
from shared.settings import Settings


def document() -> dict:
    return create_app(Settings(nats_url="nats://localhost:4222")).openapi()


def write(path: str = "docs/openapi.json") -> None:
    with open(path, "w") as f:
        json.dump(document(), f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":  # python -m services.gateway.openapi
    write()
