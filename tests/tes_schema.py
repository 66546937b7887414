"""The GA4GH TES 1.1.0 schemas (tests/data/ga4gh), made strict: an object may carry no property its schema
does not define, as strict clients (py-tes) require of a server's responses."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import yaml

SPEC = Path(__file__).parent / "data" / "ga4gh" / "task_execution_service.openapi.yaml"


@cache
def _schemas() -> dict:
    schemas = copy.deepcopy(yaml.safe_load(SPEC.read_text())["components"]["schemas"])

    def strict(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            node.pop("readOnly", None)
            node.pop("example", None)
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
    strict(schemas)
    return schemas


def check(document: dict, schema: str) -> None:
    """Raises jsonschema.ValidationError if `document` is not a strict `schema` (e.g. "tesTask")."""
    root = {"components": {"schemas": _schemas()}, **_schemas()[schema]}
    jsonschema.validate(document, root)
