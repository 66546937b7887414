"""Is this submission a job we can accept? Pure: bytes and the catalog in, a JobSpec or the problems out."""

from __future__ import annotations

import re

import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from shared.contracts.catalog import Catalog
from shared.contracts.jobs import TENANT_PATTERN, FieldError, JobSpec

_TENANT = re.compile(TENANT_PATTERN)
# The tenant token of a rejection's event subject when the body names no valid tenant; it cannot be a tenant.
UNKNOWN_TENANT = "_invalid"


class Rejection(Exception):
    def __init__(self, errors: list[FieldError], tenant: str = UNKNOWN_TENANT) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e.loc)) or 'body'}: {e.msg}" for e in errors))
        self.errors = errors
        self.tenant = tenant


def check_submission(body: bytes, catalog: Catalog, *, max_bytes: int, subject_tenant: str | None = None) -> JobSpec:
    """The accepted JobSpec, with the tenant's default residency filled in; or raise Rejection naming every problem.
    `subject_tenant`: the submitter, as the subject it came on says (the NATS server vouches for it)."""
    if len(body) > max_bytes:
        raise Rejection([FieldError(loc=[], msg=f"body too large: {len(body)} bytes, the limit is {max_bytes}")],
                        subject_tenant or UNKNOWN_TENANT)
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Rejection([FieldError(loc=[], msg=f"not valid JSON: {e}")], subject_tenant or UNKNOWN_TENANT) from None
    if not isinstance(raw, dict):
        raise Rejection([FieldError(loc=[], msg=f"a JobSpec is a JSON object, not {type(raw).__name__}")],
                        subject_tenant or UNKNOWN_TENANT)
    if subject_tenant is not None:
        raw.setdefault("tenant", subject_tenant)  # the submitter is known: a body may leave its tenant out
    claimed = raw.get("tenant")
    valid_claim = isinstance(claimed, str) and _TENANT.fullmatch(claimed) is not None
    # a rejection is the submitter's event, never that of the tenant its body names
    tenant = subject_tenant or (str(claimed) if valid_claim else UNKNOWN_TENANT)

    errors: list[FieldError] = []
    spec: JobSpec | None = None
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        errors = [FieldError(loc=list(err["loc"]), msg=_message(err)) for err in e.errors()]
    if valid_claim and claimed not in catalog.tenants:
        errors.append(FieldError(loc=["tenant"], msg=f"unknown tenant {claimed!r}: not in the tenant catalog"))
    if subject_tenant is not None and claimed != subject_tenant:
        errors.append(FieldError(loc=["tenant"], msg=f"tenant {claimed!r} is not the submitter, {subject_tenant!r}: "
                                                   f"a tenant submits only its own jobs"))
    if errors or spec is None:
        raise Rejection(errors, tenant)

    if spec.residency is None:
        spec = spec.model_copy(update={"residency": catalog.tenants[spec.tenant].residency})
    return spec


def _message(err: ErrorDetails) -> str:
    return "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
