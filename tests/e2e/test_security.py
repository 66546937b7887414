"""Trust on the bus: `continuum auth init`'s configuration on a real nats-server, `continuum up --auth`, and every
party tried as itself against it: tenants, sites, the operator, and clients without the right credentials. Each
attack is made for real; what stops it is the server (or, for a site's reports, routing's check)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig

from services.auth import credentials, site_principal, tenant_principal
from services.runtime import EmbeddedNats
from shared.bus import connect, request_json
from shared.contracts.jobs import JobEvent, JobEventData, JobState
from shared.settings import Settings
from tests.conftest import SUBJECTS, TOPOLOGY, listen
from tests.e2e.harness import CATALOG, FAST, connect_when_up, start_system

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]


def auth_init(out: Path, tenants: Path = CATALOG / "tenants.yaml", *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "services.cli", "auth", "init", "--sites",
                             str(CATALOG / "sites.yaml"), "--tenants", str(tenants), "--out", str(out), *extra],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ, COLUMNS="200"),
                            check=False)
    assert result.returncode == 0, result.stderr
    secrets = [f.read_text().strip() for f in (*out.glob("creds/*.nk"), *out.glob("tokens/*.token"))]
    assert secrets and not any(s in result.stdout + result.stderr for s in secrets), "a secret was printed"
    return result


@pytest.fixture
def auth(tmp_path) -> Path:
    auth_init(tmp_path / "auth")
    return tmp_path / "auth"


@pytest.fixture
def secure_server(auth, tmp_path):
    server = EmbeddedNats(tmp_path / "nats", config=auth / "nats.conf").start()
    yield server
    server.stop()


def as_(server, auth: Path, principal: str) -> Settings:
    return Settings(nats_url=server.url, nats_creds=credentials(auth, principal), nats_ca=auth / "tls" / "ca.pem")


@pytest.fixture
def system(secure_server, auth, tmp_path):
    yield from start_system(secure_server, tmp_path, args=("--auth", str(auth)))


class Refusals:
    """What the server said no to on one connection (its permission errors come asynchronously): `on_error` is
    the connection's error callback."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.changed = asyncio.Event()

    async def on_error(self, error: Exception) -> None:
        self.said.append(str(error))
        self.changed.set()

    async def wait_for(self, words: str, timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not any(words.lower() in s.lower() for s in self.said):  # nats-py lowers the case
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"the server did not say {words!r}; it said {self.said}") from None


def job(tenant: str, runtime_s: float = 0.0, **extra) -> dict:
    return {"tenant": tenant, "command": ["train"], "resources": {"gpus": 1},
            "labels": {"sim.runtime_s": str(runtime_s)}, **extra}


async def test_a_tenant_reaches_only_its_own_jobs_bills_and_events(system, secure_server, auth):
    op = await connect_when_up(system, client=as_(secure_server, auth, "operator"))
    lab = await connect(as_(secure_server, auth, tenant_principal("lab")))
    startup = await connect(as_(secure_server, auth, tenant_principal("startup")))
    everything, labs_contract, labs_all = await listen(op), await listen(lab), []

    async def on_any(msg) -> None:
        labs_all.append(msg.subject)
    await lab.subscribe(">", cb=on_any)
    await lab.flush()

    # its own jobs, on the contract's subjects in its own account
    quick = (await request_json(lab, SUBJECTS.jobs_submit, job("lab")))["job_id"]
    long = await request_json(lab, SUBJECTS.jobs_submit, job("lab", runtime_s=600))
    assert long["state"] == "accepted"
    named_other = await request_json(lab, SUBJECTS.jobs_submit, job("startup"))
    assert named_other["state"] == "rejected"
    assert named_other["errors"][0]["msg"].startswith("tenant 'startup' is not the submitter, 'lab'")
    await labs_contract.wait_for(lambda: quick in labs_contract.billed and "started" in labs_contract.kinds(
        long["job_id"]), 30, "lab's quick job billed and its long one running")
    assert (await request_json(lab, SUBJECTS.jobs_get, {"job_id": quick}))["state"] == "succeeded"
    cancel = await request_json(lab, SUBJECTS.jobs_cancel, {"job_id": long["job_id"]})
    assert cancel["state"] in ("cancelling", "cancelled")
    bill = await request_json(lab, SUBJECTS.billing_statement, {"tenant": "lab"})
    assert quick in [line["job_id"] for line in bill["lines"]]

    # another tenant's work: it runs, and lab neither sees nor touches it
    theirs = [(await request_json(startup, SUBJECTS.jobs_submit, job("startup")))["job_id"] for _ in range(50)]
    await everything.wait_for(lambda: all(j in everything.billed for j in theirs), 60, "startup's 50 jobs billed")
    # "not found", as for a job that does not exist: an id says nothing of other tenants
    assert await request_json(lab, SUBJECTS.jobs_get, {"job_id": theirs[0]}) == {"error": f"no job {theirs[0]!r}"}
    assert await request_json(lab, SUBJECTS.jobs_cancel, {"job_id": theirs[1]}) == {"error": f"no job {theirs[1]!r}"}
    assert (await request_json(startup, SUBJECTS.jobs_get, {"job_id": theirs[1]}))["state"] == "succeeded"
    assert (await request_json(lab, SUBJECTS.billing_statement, {"tenant": "startup"})) == {
        "error": "unknown tenant 'startup': not in the tenant catalog"}
    # publishing into another tenant's intake stores nothing: the subject leads nowhere in lab's account
    intake = (await op.jetstream().stream_info(TOPOLOGY.intake_stream)).state.last_seq
    with pytest.raises(nats.errors.Error):  # no stream answers: a time-out, or no responders
        await lab.jetstream().publish(SUBJECTS.intake("startup"), json.dumps(job("startup")).encode(), timeout=1.0)
    assert (await op.jetstream().stream_info(TOPOLOGY.intake_stream)).state.last_seq == intake

    # and its own history from the start, by pages
    page = await request_json(lab, SUBJECTS.jobs_history, {"after_seq": 0, "limit": 1000})
    subjects = {e["subject"] for e in page["events"]}
    assert SUBJECTS.job_event("lab", quick, "accepted") in subjects
    assert subjects and all(".lab." in s for s in subjects)
    asked_for_theirs = await request_json(lab, SUBJECTS.jobs_history, {"tenant": "startup", "limit": 1000})
    assert asked_for_theirs["events"] and all(".lab." in e["subject"] for e in asked_for_theirs["events"])

    await everything.wait_for(lambda: "cancelled" in everything.kinds(long["job_id"]), 30, "lab's cancel")
    # what lab received, on `continuum.events.>` and on `>`: its own and the sites', none of startup's
    received = [e["type"] for e in labs_contract.events]
    assert any(t == "continuum.billing.usage" for t in received) and labs_all
    assert all(".startup." not in s for s in labs_all)
    assert all(e["data"].get("tenant") in (None, "lab") for e in labs_contract.events)
    # the operator saw everyone's, and may cancel anyone's job
    assert any(e["data"].get("tenant") == "startup" for e in everything.events)
    other = (await request_json(startup, SUBJECTS.jobs_submit, job("startup", runtime_s=600)))["job_id"]
    await everything.wait_for(lambda: "started" in everything.kinds(other), 30, "startup's long job running")
    assert (await request_json(op, SUBJECTS.jobs_cancel, {"job_id": other}))["state"] == "cancelling"
    await everything.wait_for(lambda: "cancelled" in everything.kinds(other), 30, "the operator's cancel")
    for nc in (op, lab, startup):
        await nc.close()


async def test_a_site_takes_only_its_own_orders_and_reports_only_on_its_own_jobs(system, secure_server, auth):
    op = await connect_when_up(system, client=as_(secure_server, auth, "operator"))
    events = await listen(op)
    # a job only the Dutch site can run, running there long enough to be lied about
    placed_at_nl = (await request_json(op, SUBJECTS.jobs_submit, job("startup", runtime_s=3, residency="NL")))["job_id"]
    await events.wait_for(lambda: "started" in events.kinds(placed_at_nl), 30, "the job running at cloud-nl")
    refusals = Refusals()
    se = await connect(as_(secure_server, auth, site_principal("cloud-se")), error_cb=refusals.on_error)
    js = se.jetstream()

    # another site's orders: neither its consumer, nor a consumer of one's own on its subject, nor its replies
    run_nl, _ = TOPOLOGY.site_durables("cloud-nl")
    with pytest.raises(nats.errors.Error):
        await js.consumer_info(TOPOLOGY.dispatch_stream, run_nl, timeout=1.0)
    next_msg = f"$JS.API.CONSUMER.MSG.NEXT.{TOPOLOGY.dispatch_stream}.{run_nl}"
    await se.publish(next_msg, b"1", reply="_INBOX_site-cloud-se.x")
    await refusals.wait_for(f"Permissions Violation for Publish to \"{next_msg}\"")
    with pytest.raises(nats.errors.Error):
        await js.add_consumer(TOPOLOGY.dispatch_stream, ConsumerConfig(
            durable_name="theft", filter_subject=SUBJECTS.dispatch("cloud-nl")), timeout=1.0)
    await se.subscribe("_INBOX.>")
    await refusals.wait_for('Permissions Violation for Subscription to "_INBOX.>"')
    # a job's record only for a job placed at the site, by asking intake; no JetStream read of the registry
    assert await request_json(se, SUBJECTS.site_job("cloud-se"), {"job_id": placed_at_nl}) == {
        "error": f"no job {placed_at_nl!r}"}
    jobs = TOPOLOGY.jobs_bucket
    for subject, body in ((f"$JS.API.DIRECT.GET.KV_{jobs}.$KV.{jobs}.*", b""),
                          (f"$JS.API.STREAM.INFO.KV_{jobs}", b'{"subjects_filter": ">"}'),
                          (SUBJECTS.site_job("cloud-nl"), json.dumps({"job_id": placed_at_nl}).encode())):
        await se.publish(subject, body, reply="_INBOX_site-cloud-se.y")
        await refusals.wait_for(f'Permissions Violation for Publish to "{subject}"')
    nl = await connect(as_(secure_server, auth, site_principal("cloud-nl")))
    assert (await request_json(nl, SUBJECTS.site_job("cloud-nl"), {"job_id": placed_at_nl}))["tenant"] == "startup"
    await nl.close()

    # a forged end of the Dutch job: straight into the event stream, on the Dutch site's report subject, or as
    # its own report, which passes the server (its subject) but not routing's check
    tenant = "startup"
    forged = JobEvent.make("agent/cloud-nl", "job", "succeeded", placed_at_nl, JobEventData(
        job_id=placed_at_nl, tenant=tenant, state=JobState.succeeded, site="cloud-se", exit_code=0, attempt=0),
        placed_at_nl, 0)
    await se.publish(SUBJECTS.job_event(tenant, placed_at_nl, "succeeded"), forged.model_dump_json().encode())
    await refusals.wait_for("Permissions Violation for Publish to \"continuum.events.job.")
    await se.publish(SUBJECTS.job_report("cloud-nl", tenant, placed_at_nl, "succeeded"), b"{}")
    await refusals.wait_for("Permissions Violation for Publish to \"continuum.reports.cloud-nl.")
    # its own site's token, then another site's report subject after it
    await se.publish(f"continuum.reports.cloud-se.cloud-nl.{tenant}.{placed_at_nl}.succeeded",
                     forged.model_dump_json().encode())
    await refusals.wait_for("Permissions Violation for Publish to \"continuum.reports.cloud-se.cloud-nl.")
    await js.publish(SUBJECTS.job_report("cloud-se", tenant, placed_at_nl, "succeeded"),
                     forged.model_dump_json().encode(),
                     # the event's id, as a message id: it must not keep the real report out
                     headers={"Nats-Msg-Id": forged.id, "Continuum-Attempt": "0"})

    dlq = await op.jetstream().pull_subscribe(SUBJECTS.dead_letter("routing"), durable=None,
                                              stream=TOPOLOGY.dead_letter_stream)
    (dead,) = await dlq.fetch(1, timeout=30)
    assert dead.headers["Continuum-Reason"] == (
        f"report refused: site cloud-se reported succeeded on job {placed_at_nl} at attempt 0, which was "
        f"dispatched to cloud-nl (attempt 0)")
    # the job ends as the site that runs it says, once
    await events.wait_for(lambda: "succeeded" in events.kinds(placed_at_nl), 30, "the job's real end")
    ends = [e for e in events.by_job[placed_at_nl] if e["type"] == "continuum.job.succeeded"]
    assert len(ends) == 1 and ends[0]["data"]["site"] == "cloud-nl" and ends[0]["source"] == "continuum/agent/cloud-nl"
    # and the site's own agent ran the job it was given (an order it could fetch)
    assert events.kinds(placed_at_nl)[-4:] == ["placed", "dispatched", "started", "succeeded"]
    await se.close()
    await op.close()


async def test_no_credentials_plain_tcp_and_a_wrong_ca_are_refused(secure_server, auth, tmp_path):
    good = as_(secure_server, auth, "operator")
    nc = await connect(good)  # the right ones work
    await nc.close()
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await connect(good.model_copy(update={"nats_creds": None}), allow_reconnect=False, max_reconnect_attempts=0)
    with pytest.raises(Exception):  # noqa: B017  # the same credentials, without TLS: refused, however it fails
        await nats.connect(secure_server.url.replace("tls://", "nats://"), nkeys_seed=str(good.nats_creds),
                           allow_reconnect=False, max_reconnect_attempts=0)
    other = tmp_path / "other"
    auth_init(other)  # another CA, that did not sign this server's certificate
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(good.model_copy(update={"nats_ca": other / "tls" / "ca.pem"}), allow_reconnect=False,
                      max_reconnect_attempts=0)
    # and what a plain TCP client gets from the TLS port
    with socket.create_connection(("127.0.0.1", secure_server.port), timeout=5) as raw:
        info = raw.recv(4096).decode()
        assert '"tls_required":true' in info
        raw.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        answer = b"".join(iter(lambda: raw.recv(4096), b""))  # until the server hangs up
        assert b"PONG" not in answer


async def test_auth_init_again_follows_the_catalog_and_the_server_reloads_it(secure_server, auth, tmp_path):
    kept = {p: credentials(auth, p).read_text() for p in ("operator", tenant_principal("lab"))}
    token = (auth / "tokens" / "tenant-lab.token").read_text()
    ca = (auth / "tls" / "ca.pem").read_bytes()
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - id: lab\n    allocation_gpu_hours: 10\n  - id: startup\n  - id: newlab\n")
    media_seed = tmp_path / "media.nk"  # kept aside: the removed tenant tries again with it
    media_seed.write_text(credentials(auth, tenant_principal("media")).read_text())
    result = auth_init(auth, tenants)
    assert "added: tenant-newlab" in result.stdout and "removed: tenant-media" in result.stdout
    assert {p: credentials(auth, p).read_text() for p in kept} == kept
    assert (auth / "tokens" / "tenant-lab.token").read_text() == token and (auth / "tls" / "ca.pem").read_bytes() == ca
    assert not credentials(auth, tenant_principal("media")).exists()
    assert not (auth / "tokens" / "tenant-media.token").exists()

    pid = secure_server.process.pid
    secure_server.reload()
    newlab = as_(secure_server, auth, tenant_principal("newlab"))

    async def reloaded() -> None:
        while True:
            try:
                return await connect(newlab, allow_reconnect=False, max_reconnect_attempts=0)
            except Exception:
                await asyncio.sleep(0.1)  # the server reads its file again on its own time
    nc = await asyncio.wait_for(reloaded(), 10)
    await nc.close()
    assert secure_server.process.pid == pid and secure_server.process.poll() is None  # no restart
    with pytest.raises(Exception, match=r"[Aa]uthorization"):  # the removed tenant's key is no longer the server's
        await connect(newlab.model_copy(update={"nats_creds": media_seed}), allow_reconnect=False,
                      max_reconnect_attempts=0)
    lab = await connect(as_(secure_server, auth, tenant_principal("lab")))  # the kept ones still work
    await lab.close()


def test_the_embedded_default_is_secure_and_the_commands_work_as_before(tmp_path):
    """`continuum up` without CONTINUUM_NATS_URL: its own server, with DATA_DIR/auth made on the way; commands act
    as the operator, or as a tenant with --as."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUUM_")}
    env.update(FAST, CONTINUUM_DATA_DIR=str(tmp_path / "data"), COLUMNS="200")

    def continuum(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True,
                              timeout=60, cwd=ROOT, check=False)
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--sites", str(CATALOG / "sites.yaml"),
                           "--tenants", str(CATALOG / "tenants.yaml")], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state = tmp_path / "data" / "state.json"
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(job("lab", runtime_s=0)))
        while True:  # until every site reports (the commands answer before that, with sites down)
            assert up.poll() is None, "continuum up exited"
            sites = continuum("sites", "--json")
            if sites.returncode == 0 and all(s["state"] == "up" for s in json.loads(sites.stdout)["sites"]):
                break
        assert json.loads(state.read_text())["nats_url"].startswith("tls://")
        assert (tmp_path / "data" / "auth" / "creds" / "operator.nk").is_file()
        watch = subprocess.Popen([sys.executable, "-m", "services.cli", "watch", "--as", "lab"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        assert "watching" in watch.stdout.readline()
        submitted = continuum("submit", str(job_file), "--as", "lab")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split()[1]
        while "continuum.job.succeeded" not in (line := watch.stdout.readline()):
            assert line, "watch ended"
        assert job_id in line
        status = continuum("status", job_id)  # the operator
        assert status.returncode == 0 and "state=succeeded" in status.stdout
        assert continuum("status", job_id, "--as", "startup").stderr.startswith(f"error: no job '{job_id}'")
        while job_id not in (bill := continuum("bill", "lab", "--format", "csv", "--as", "lab")).stdout:
            assert bill.returncode == 0, bill.stderr  # billed a moment after it ends
        assert continuum("bill", "lab", "--as", "startup").returncode == 1
        assert continuum("overflow").returncode == 0 and continuum("overflow", "--as", "lab").returncode == 1
        watch.send_signal(signal.SIGINT)
        watch.wait(10)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(30)
