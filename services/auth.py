"""Principals and credentials (CONTRACT.md, v2): `continuum auth init` writes, from the catalogs, a nats-server
configuration in which the server itself keeps each party to its own (docs/security.md says why this way).

    account SERVICES   user `services`    the services: everything in this account
                       user `operator`    everything too: every tenant's jobs and bills, top-ups, overflow, DLQ
                       user `site-<id>`   its own dispatch orders, its own heartbeats, reports on its own subject
    account <tenant>   user `tenant-<id>` nothing but what it imports: the contract's requests and its own events

A tenant's account is named after the tenant. The services export their requests with the requester's account
name as a subject token (`account_token_position`): tenant `lab` imports `continuum.jobs.submit.lab` as the
contract subject `continuum.jobs.submit`, and the services receive it on `continuum.jobs.submit.lab`, a subject
no other account can publish on. Events are exported the same way: `lab` imports `continuum.events.job.lab.>`
and can import no other tenant's.

Every principal has an nkey seed (`creds/<principal>.nk`); tenants and the operator also get an HTTP bearer token
(`tokens/<principal>.token`). TLS with a CA of our own (`tls/ca.pem`) on the client port, and on a cluster's routes
(`cluster-tls.conf`, which deploy/nats/cluster/'s servers include: mutual, the server certificate at both ends).
Running it again keeps the credentials of the principals still in the catalog, makes new ones, deletes the others;
the server takes the new configuration on a reload signal, without a restart. No secret is printed or logged.

The configuration is a function of the catalog, the public keys and the file paths (`nats_conf`, pure); the
rest writes files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.contracts.catalog import Catalog
from shared.contracts.streams import Topology
from shared.contracts.subjects import Subjects, inbox_prefix

SERVICES_ACCOUNT = "SERVICES"  # upper case: no tenant id (lower case by the catalog's pattern) can take it
SERVICES_PRINCIPAL, OPERATOR_PRINCIPAL = "services", "operator"
CERT_DAYS = 825  # what browsers and most TLS clients accept for a server certificate
# the server certificate serves clients, and on a cluster's routes each server is also the client of the others
SERVER_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
# JetStream writes to disk before it acknowledges, rather than every two minutes: an acknowledged submission or
# event survives a power failure of the host (docs/security.md, "Durability")
SYNC_INTERVAL = "always"


def tenant_principal(tenant_id: str) -> str:
    return f"tenant-{tenant_id}"


def site_principal(site_id: str) -> str:
    return f"site-{site_id}"


def credentials(auth: Path, principal: str) -> Path:
    """A principal's nkey seed in an `auth init` folder."""
    return auth / "creds" / f"{principal}.nk"


def principals(catalog: Catalog) -> list[str]:
    return [SERVICES_PRINCIPAL, OPERATOR_PRINCIPAL, *(site_principal(s) for s in catalog.sites),
            *(tenant_principal(t) for t in catalog.tenants)]


# --- the configuration (pure) --------------------------------------------------------------------------------

def site_permissions(site_id: str, subjects: Subjects, topology: Topology) -> dict:
    """A site's agent: fetch and ack its own dispatch and stop orders (the consumers the services declare for
    it), send its own heartbeats and reports, ask for the record of a job dispatched to it (intake answers only
    for those), and receive on its own inbox. No JetStream API beyond its two consumers: a stream's info or a
    key-value read would show it other tenants' jobs."""
    stream = topology.dispatch_stream
    publish = [subjects.heartbeat(site_id), subjects.report(site_id), subjects.site_job(site_id)]
    for durable in topology.site_durables(site_id):
        publish += [f"$JS.API.CONSUMER.INFO.{stream}.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                    f"$JS.ACK.{stream}.{durable}.>"]
    return {"publish": {"allow": publish},
            "subscribe": {"allow": [f"{inbox_prefix(site_principal(site_id))}.>"]}}


def tenant_requests(subjects: Subjects) -> list[str]:
    """The requests a tenant may send, each served on `<subject>.<tenant>` (the tenant token the server adds)."""
    return [subjects.jobs_submit, subjects.jobs_get, subjects.jobs_cancel, subjects.billing_statement,
            subjects.jobs_history]


def nats_conf(catalog: Catalog, keys: dict[str, str], tls_dir: Path, subjects: Subjects, topology: Topology,
              sync_interval: str = SYNC_INTERVAL) -> str:
    """The nats-server configuration for this catalog, given each principal's public nkey."""
    def export(kind: str, subject: str) -> dict:
        """A `*` in the subject is the importing account's name: the server checks it."""
        tokens = subject.split(".")
        return {kind: subject, **({"account_token_position": tokens.index("*") + 1} if "*" in tokens else {})}

    exports = [export("service", f"{s}.*") for s in tenant_requests(subjects)]
    exports += [export("service", subjects.intake("*")), export("service", subjects.sites_list)]
    exports += [export("stream", s) for s in (*subjects.tenant_events("*"), subjects.site_events_all)]
    users: list[dict] = [{"nkey": keys[SERVICES_PRINCIPAL]}, {"nkey": keys[OPERATOR_PRINCIPAL]}]
    users += [{"nkey": keys[site_principal(s)], "permissions": site_permissions(s, subjects, topology)}
              for s in catalog.sites]
    accounts: dict[str, dict] = {SERVICES_ACCOUNT: {"jetstream": "enabled", "users": users, "exports": exports}}
    for tenant in catalog.tenants:
        imports: list[dict] = [{"service": {"account": SERVICES_ACCOUNT, "subject": f"{s}.{tenant}"}, "to": s}
                               for s in tenant_requests(subjects)]
        imports += [{"service": {"account": SERVICES_ACCOUNT, "subject": s}}
                    for s in (subjects.intake(tenant), subjects.sites_list)]
        imports += [{"stream": {"account": SERVICES_ACCOUNT, "subject": s}}
                    for s in (*subjects.tenant_events(tenant), subjects.site_events_all)]
        accounts[tenant] = {"users": [{"nkey": keys[tenant_principal(tenant)]}], "imports": imports}
    tls = _server_tls(tls_dir)
    lines = [
        "# written by `continuum auth init` from the catalog: re-run it rather than edit this file",
        "# run as: nats-server -c nats.conf -p PORT -sd STORE_DIR",
        f"jetstream: {json.dumps({'sync_interval': sync_interval})}",
        # room for a body of 900 KB to reach intake and be refused with a reason, not cut by the server
        "max_payload: 2MB",
        f"tls: {json.dumps(tls)}",
        f"accounts: {json.dumps(accounts, indent=2)}",
        "",
    ]
    return "\n".join(lines)


def _server_tls(tls_dir: Path) -> dict:
    return {"cert_file": str(tls_dir / "server.pem"), "key_file": str(tls_dir / "server-key.pem"), "timeout": 5}


def cluster_tls_conf(tls_dir: Path) -> str:
    """The TLS of a cluster's routes, for a `cluster {}` block to include (deploy/nats/cluster/): each server shows
    the others the server certificate, and takes as a route only a peer whose certificate this CA signed (nats-server
    verifies a route's peer whenever the cluster has TLS; `verify` says so here too). Without TLS on the routes,
    whoever reaches the route port would join the cluster and read every account's messages."""
    tls = {**_server_tls(tls_dir), "ca_file": str(tls_dir / "ca.pem"), "verify": True}
    return "\n".join([
        "# written by `continuum auth init`: the TLS of a cluster's routes, included in its `cluster {}` block",
        f"tls: {json.dumps(tls)}",
        "",
    ])


# --- the files ------------------------------------------------------------------------------------------------

@dataclass
class Changes:
    """What a run of `auth init` did, by principal name: never a secret."""

    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    certificate: str = "kept"


def init(out: Path, catalog: Catalog, hosts: list[str] | None = None, prefix: str = "continuum",
         sync_interval: str = SYNC_INTERVAL, server_dir: Path | None = None) -> Changes:
    """Write (or bring up to date) DIR's configuration, credentials, tokens and TLS files for this catalog. The
    configuration names the TLS files by absolute path, under `server_dir` if given: where the server will find
    this folder (a Kubernetes Secret mounted elsewhere than where it was written), else where it is."""
    subjects = Subjects(prefix)
    changes = Changes()
    creds, tokens, tls = out / "creds", out / "tokens", out / "tls"
    for folder in (out, creds, tokens, tls):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
    wanted = principals(catalog)
    keys = {}
    for principal in wanted:
        seed_file = creds / f"{principal}.nk"
        if seed_file.exists():
            changes.kept.append(principal)
        else:
            _write_secret(seed_file, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode() + "\n")
            changes.added.append(principal)
        keys[principal] = nkeys.from_seed(seed_file.read_text().strip().encode()).public_key.decode()
        if principal != SERVICES_PRINCIPAL and not principal.startswith("site-"):  # people and their HTTP clients
            token_file = tokens / f"{principal}.token"
            if not token_file.exists():
                _write_secret(token_file, secrets.token_urlsafe(32) + "\n")
    for folder, suffix in ((creds, ".nk"), (tokens, ".token")):
        for stale in folder.glob(f"*{suffix}"):
            if stale.stem not in wanted:
                stale.unlink()
                if suffix == ".nk":
                    changes.removed.append(stale.stem)
    changes.certificate = _ensure_tls(tls, sorted({"localhost", "127.0.0.1", *(hosts or [])}))
    served = (server_dir / "tls") if server_dir else tls.resolve()
    conf = nats_conf(catalog, keys, served, subjects, Topology(subjects), sync_interval)
    _write_atomically(out / "cluster-tls.conf", cluster_tls_conf(served))
    _write_atomically(out / "nats.conf", conf)
    return changes


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reload never reads half a file


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _ensure_tls(tls: Path, hosts: list[str]) -> str:
    """A CA (kept once made: clients trust it) and a server certificate for `hosts`, made again when they
    change or it nears its end."""
    ca_file, ca_key_file = tls / "ca.pem", tls / "ca-key.pem"
    cert_file, key_file = tls / "server.pem", tls / "server-key.pem"
    now = dt.datetime.now(dt.UTC)
    if ca_file.exists() and ca_key_file.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        # the key this function made below (an EC key): one that signs certificates
        ca_key = cast(CertificateIssuerPrivateKeyTypes,
                      serialization.load_pem_private_key(ca_key_file.read_bytes(), None))
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Continuum CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write_secret(ca_key_file, ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()).decode())
        ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        cert_file.unlink(missing_ok=True)  # signed by a CA that is gone
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    if cert_file.exists() and key_file.exists():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        if set(san) == set(names) and usages == set(SERVER_USAGES) \
                and cert.not_valid_after_utc - now > dt.timedelta(days=30):
            return "kept"
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(list(SERVER_USAGES)), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_secret(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode())
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return "issued"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
