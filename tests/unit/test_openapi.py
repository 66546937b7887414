"""docs/openapi.json is the gateway's document as the code builds it, with the paths the contract fixes."""

from __future__ import annotations

import json
from pathlib import Path

from services.gateway.openapi import document

ROOT = Path(__file__).parents[2]


def test_the_committed_document_is_the_codes():
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == document(), "docs/openapi.json is stale: .venv/bin/python -m services.gateway.openapi"


def test_the_contracts_paths_are_there():
    paths = document()["paths"]
    tes = "/ga4gh/tes/v1"
    assert {f"{tes}/service-info", f"{tes}/tasks", f"{tes}/tasks/{{id}}", f"{tes}/tasks/{{id}}:cancel"} <= set(paths)
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel", "/api/v1/sites",
            "/api/v1/tenants/{tenant}/statement", "/api/v1/events"} <= set(paths)
    assert set(paths[f"{tes}/tasks"]) == {"get", "post"}
    assert paths[f"{tes}/tasks"]["get"]["operationId"] == "ListTasks"
