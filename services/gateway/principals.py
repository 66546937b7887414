"""Who an HTTP request is (CONTRACT.md, v2 "HTTP", Auth): a bearer token (or HTTP Basic, the principal as user
and the token as password) from `continuum auth init`'s `tokens/<principal>.token`, or nobody on an open API.

A tenant's token acts as that tenant and nothing more: the gateway sends its requests on the subjects a
tenant's own NATS account reaches the services by (`<subject>.<tenant>`), so the services answer it as they
answer the tenant itself (another tenant's job is "not found"); the operator's acts for every tenant.
Tokens are compared by their SHA-256 digests, in constant time; a token not known is looked for again on
disk (at most once a second), so a tenant added by `auth init` needs no gateway restart."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from services.auth import OPERATOR_PRINCIPAL

TENANT_PREFIX = "tenant-"
RELOAD_EVERY_S = 1.0


@dataclass(frozen=True)
class Principal:
    name: str
    # the tenant a tenant principal acts as; None: every tenant (the operator, or anyone on an open API)
    tenant: str | None

    def scoped(self, subject: str) -> str:
        """The contract subject this principal's request goes on."""
        return f"{subject}.{self.tenant}" if self.tenant else subject

    def may_see(self, tenant: str) -> bool:
        return self.tenant in (None, tenant)


OPEN = Principal("anonymous", None)


class Unauthorized(Exception):
    pass


class Tokens:
    """The bearer tokens of a folder (`auth init`'s DIR/tokens); without a folder, the API is open."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._by_digest: dict[bytes, str] = {}
        self._read_at = float("-inf")
        self._read()

    @property
    def open(self) -> bool:
        return self.folder is None

    def _read(self) -> None:
        self._read_at = time.monotonic()
        if self.folder is None:
            return
        found = {}
        for path in sorted(self.folder.glob("*.token")):
            token = path.read_text().strip()
            if token:
                found[_digest(token)] = path.stem
        self._by_digest = found

    def _principal_of(self, token: str) -> str | None:
        digest = _digest(token)
        name = self._lookup(digest)
        if name is None and time.monotonic() - self._read_at >= RELOAD_EVERY_S:
            self._read()
            name = self._lookup(digest)
        return name

    def _lookup(self, digest: bytes) -> str | None:
        name = None
        for known, principal in self._by_digest.items():  # every one compared: no early way out to time
            if hmac.compare_digest(known, digest):
                name = principal
        return name

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization` header; Unauthorized if it names none (the reason never
        says whether a token exists)."""
        if self.open:
            return OPEN
        if not authorization:
            raise Unauthorized("send Authorization: Bearer <token> (auth init's tokens/<principal>.token)")
        scheme, _, credentials = authorization.partition(" ")
        claimed = None
        if scheme.lower() == "bearer":
            token = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                claimed, _, token = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise Unauthorized("a Basic authorization that is not base64 of user:password") from None
        else:
            raise Unauthorized("use the Bearer or Basic scheme")
        name = self._principal_of(token) if token else None
        if name is None or claimed not in (None, name):
            raise Unauthorized("not a valid token")
        if name == OPERATOR_PRINCIPAL:
            return Principal(name, None)
        if name.startswith(TENANT_PREFIX):
            return Principal(name, name.removeprefix(TENANT_PREFIX))
        raise Unauthorized("not a valid token")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
