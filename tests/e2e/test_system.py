"""The system as a user runs it: `continuum up` as a subprocess on its own nats-server, driven only
through the public contract with a plain nats-py client."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import orjson
import pytest

from shared.bus import request_json
from tests.conftest import SUBJECTS, TOPOLOGY, listen, read_stream
from tests.e2e.harness import (
    FINAL,
    connect_when_up,
    record_when,
    start_system,
    wait_all_final,
)

pytestmark = pytest.mark.e2e
SITE_COUNTRY = {"hpc-fr": "FR", "cloud-fr": "FR", "cloud-nl": "NL", "cloud-se": "SE"}
SITE_CERTS = {"cloud-fr": {"secnumcloud"}}
NORMAL_RUN = ["accepted", "placed", "dispatched", "started"]


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path)


def job(i: int, runtime: float = 0.05, **extra) -> dict:
    tenants = ("lab", "startup", "media")
    gpu_types = ("H100", "A100", "L40S", "L4", "any")
    spec = {"tenant": tenants[i % 3], "name": f"job-{i}", "command": ["train"],
            "resources": {"gpus": 1 + i % 4, "gpu_type": gpu_types[i % 5]}, "walltime_s": 600,
            "labels": {"sim.runtime_s": str(runtime)}}
    if spec["tenant"] == "media" and spec["resources"]["gpu_type"] in ("A100", "L40S"):
        spec["resources"]["gpu_type"] = "H100"  # media's FR sites offer H100 and L4 only
    if spec["tenant"] == "lab" and spec["resources"]["gpu_type"] == "L4":
        spec["resources"]["gpu_type"] = "A100"
    if spec["tenant"] == "startup" and spec["resources"]["gpu_type"] == "A100":
        spec["resources"]["gpu_type"] = "L40S"  # A100s are public capacity only, and startup has no allocation
    if i % 7 == 0:
        spec["labels"]["sim.exit_code"] = "2"
    if i % 11 == 0:
        spec["certifications"] = ["secnumcloud"]
        spec["resources"]["gpu_type"] = "H100"
        spec["tenant"] = "startup"
    spec.update(extra)
    return spec


async def submit_all(nc, specs: list[dict]) -> list[str]:
    replies = await asyncio.gather(*(request_json(nc, SUBJECTS.jobs_submit, s, timeout=10) for s in specs))
    assert all(r["state"] == "accepted" for r in replies), [r for r in replies if r["state"] != "accepted"][:3]
    return [r["job_id"] for r in replies]


async def check_batch(nc, job_ids: list[str], specs: list[dict]) -> None:
    """Every job's stored events follow the contract; jobs.get and the statements agree with them."""
    stored = await read_stream(nc)
    by_job: dict[str, list[dict]] = {}
    usage: Counter = Counter()
    for subject, event in stored:
        assert subject.split(".")[-1] == event["type"].rsplit(".", 1)[-1]
        assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"
        if event["type"] == "continuum.billing.usage":
            usage[event["data"]["job_id"]] += 1
        elif event["type"].startswith("continuum.job."):
            by_job.setdefault(event["data"]["job_id"], []).append(event)
    assert max(usage.values(), default=0) == 1, "a job was billed twice"

    lines_by_tenant = {}
    for tenant in ("lab", "startup", "media"):
        statement = await request_json(nc, SUBJECTS.billing_statement, {"tenant": tenant})
        ids = [line["job_id"] for line in statement["lines"]]
        assert len(ids) == len(set(ids))
        assert statement["totals"]["gpu_hours"] == pytest.approx(sum(line["gpu_hours"] for line in statement["lines"]),
                                                                 abs=1e-5)
        lines_by_tenant.update({line["job_id"]: line for line in statement["lines"]})

    for job_id, spec in zip(job_ids, specs, strict=True):
        kinds = [e["type"].rsplit(".", 1)[-1] for e in by_job[job_id]]
        finals = [k for k in kinds if k in FINAL]
        assert len(finals) == 1, (job_id, kinds)
        without_queued = [k for k in kinds if k != "queued"]
        expected_final = "failed" if spec["labels"].get("sim.exit_code", "0") != "0" else "succeeded"
        assert without_queued == [*NORMAL_RUN, expected_final], (job_id, kinds)
        placed = next(e for e in by_job[job_id] if e["type"].endswith(".placed"))
        site = placed["data"]["site"]
        decision = placed["data"]["decision"]
        assert decision["site"] == site and {c["site"] for c in decision["candidates"]} == set(SITE_COUNTRY)
        if spec["tenant"] == "media":  # residency FR, the tenant's default
            assert SITE_COUNTRY[site] == "FR", (job_id, site)
        assert set(spec.get("certifications", [])) <= SITE_CERTS.get(site, set()) | set(), (job_id, site)
        assert all(e["data"]["job_id"] == job_id and e["subject"] == job_id for e in by_job[job_id])

        record = await record_when(nc, job_id, finals[0])
        assert record["state"] == finals[0] and record["site"] == site
        assert [h["state"] for h in record["history"]] == kinds
        if finals[0] == "failed":
            assert record["exit_code"] == 2
        line = lines_by_tenant[job_id]
        assert line["site"] == site and line["gpus"] == spec["resources"]["gpus"]
    assert set(lines_by_tenant) == set(job_ids), "one usage line per finished job"


async def test_a_batch_of_200_jobs_runs_end_to_end(system):
    nc = await connect_when_up(system)
    events = await listen(nc)
    specs = [job(i) for i in range(200)]
    job_ids = await submit_all(nc, specs)
    await wait_all_final(events, job_ids, timeout=180)
    await check_batch(nc, job_ids, specs)
    await nc.close()


async def test_same_idempotency_key_gives_one_job(system):
    nc = await connect_when_up(system)
    spec = job(1, idempotency_key="nightly-2026-11-25")
    first = await request_json(nc, SUBJECTS.jobs_submit, spec)
    second = await request_json(nc, SUBJECTS.jobs_submit, spec)
    assert first["state"] == second["state"] == "accepted"
    assert first["job_id"] == second["job_id"]
    # fire-and-forget intake: the same Nats-Msg-Id twice is one job too
    events = await listen(nc)
    emitted = job(2)
    js = nc.jetstream()
    for _ in range(2):
        await js.publish(SUBJECTS.intake(emitted["tenant"]), orjson.dumps(emitted), headers={"Nats-Msg-Id": "emit-42"})
    await events.wait_for(lambda: any(e["type"] == "continuum.job.accepted" for e in events.events), 30,
                          "the intake event to be accepted")
    await nc.flush()
    other = await request_json(nc, SUBJECTS.jobs_submit, job(2, idempotency_key="emit-42"))
    accepted = [e for e in events.events if e["type"] == "continuum.job.accepted"]
    assert [e["data"]["job_id"] for e in accepted] == [other["job_id"]]
    await nc.close()


MALFORMED = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (orjson.dumps({"tenant": "lab", "command": "train"}), "valid list"),
    (orjson.dumps({"tenant": "nobody", "command": ["x"]}), "unknown tenant"),
    (orjson.dumps({"tenant": "lab", "command": ["x"], "resources": {"gpus": -1}}), "greater than or equal to 0"),
    (orjson.dumps({"tenant": "lab", "command": ["x"], "pad": "x" * 900_000}), "body too large"),
    (orjson.dumps({"tenant": "lab"}), "Field required"),
    (orjson.dumps({"tenant": "lab", "command": ["x"], "walltime_s": "soon"}), "valid integer"),
]


async def test_malformed_submissions_are_rejected_with_reasons_and_service_goes_on(system):
    nc = await connect_when_up(system)
    sent = [MALFORMED[i % len(MALFORMED)] for i in range(1000)]

    async def send(body: bytes, expected: str) -> None:
        reply = orjson.loads((await nc.request(SUBJECTS.jobs_submit, body, timeout=30)).data)
        assert reply["state"] == "rejected"
        assert any(expected in e["msg"] for e in reply["errors"]), (expected, reply["errors"])

    for chunk in range(0, len(sent), 100):
        await asyncio.gather(*(send(b, e) for b, e in sent[chunk:chunk + 100]))
    ok = await request_json(nc, SUBJECTS.jobs_submit, job(3))
    assert ok["state"] == "accepted"
    bad_get = await request_json(nc, SUBJECTS.jobs_get, {"nope": 1})
    assert "error" in bad_get
    await nc.close()


@pytest.mark.parametrize("victim", ["routing", "billing"])
async def test_sigkill_of_a_service_mid_batch_loses_nothing(system, victim):
    nc = await connect_when_up(system)
    events = await listen(nc)
    specs = [job(i, runtime=0.3) for i in range(120)]
    job_ids = await submit_all(nc, specs)
    await events.wait_for(lambda: sum(any(k in FINAL for k in events.kinds(j)) for j in job_ids) >= 20, 60,
                          "a first part of the batch to finish")
    old = system.pid(victim)
    os.kill(old, signal.SIGKILL)
    await wait_all_final(events, job_ids, timeout=180)
    assert system.pid(victim) != old, "the supervisor restarted the service"
    await check_batch(nc, job_ids, specs)
    await nc.close()


async def test_a_job_no_site_can_run_is_rejected_with_reasons(system):
    nc = await connect_when_up(system)
    events = await listen(nc)
    reply = await request_json(nc, SUBJECTS.jobs_submit,
                               job(1, tenant="media", resources={"gpus": 64, "gpu_type": "H100"}))
    job_id = reply["job_id"]
    await events.wait_for(lambda: "rejected" in events.kinds(job_id), 30, "the rejection")
    record = await record_when(nc, job_id, "rejected")
    assert record["state"] == "rejected"
    assert any("residency FR" in r for r in record["reasons"])
    assert any("needs 64 H100" in r for r in record["reasons"])
    await nc.close()


async def test_a_message_that_keeps_failing_is_dead_lettered_with_its_reason(system):
    nc = await connect_when_up(system)
    js = nc.jetstream()
    await js.publish(SUBJECTS.job_event("lab", "broken", "succeeded"), b"this is no event",
                     stream=TOPOLOGY.events_stream)
    sub = await js.pull_subscribe(SUBJECTS.dead_letter("billing"), durable=None, stream=TOPOLOGY.dead_letter_stream)
    msgs = await sub.fetch(1, timeout=30)
    assert msgs[0].data == b"this is no event"
    assert msgs[0].headers["Continuum-Subject"] == SUBJECTS.job_event("lab", "broken", "succeeded")
    assert "Continuum-Reason" in msgs[0].headers and int(msgs[0].headers["Continuum-Tries"]) == 3
    ok = await request_json(nc, SUBJECTS.billing_statement, {"tenant": "lab"})
    assert ok["tenant"] == "lab"
    await nc.close()


async def test_cancel_a_running_job(system):
    nc = await connect_when_up(system)
    events = await listen(nc)
    reply = await request_json(nc, SUBJECTS.jobs_submit, job(1, runtime=300))
    job_id = reply["job_id"]
    await events.wait_for(lambda: "started" in events.kinds(job_id), 30, "the job to start")
    answer = await request_json(nc, SUBJECTS.jobs_cancel, {"job_id": job_id, "reason": "wrong config"})
    assert answer == {"job_id": job_id, "state": "cancelling"}
    await events.wait_for(lambda: "cancelled" in events.kinds(job_id), 30, "the cancellation")
    await events.wait_for(lambda: job_id in events.billed, 30, "the usage line of the cancelled run")
    record = await record_when(nc, job_id, "cancelled")
    assert record["state"] == "cancelled"
    await nc.close()


async def test_three_routing_replicas_never_overcommit_a_site(system):
    """2,000 jobs at once, placed by three routers sharing the work: the agents' own accounting shows that no
    dispatch ever found its GPUs taken."""
    system.add_replica("routing")
    system.add_replica("routing")
    nc = await connect_when_up(system)
    events = await listen(nc)
    beats: dict[str, dict] = {}

    async def on_beat(msg) -> None:
        beat = orjson.loads(msg.data)
        beats[beat["site_id"]] = beat

    await nc.subscribe(SUBJECTS.heartbeat("*"), cb=on_beat)
    specs = [job(i, runtime=0.05) for i in range(int(os.environ.get("REPLICA_TEST_JOBS", "2000")))]
    job_ids = []
    for chunk in range(0, len(specs), 200):
        job_ids += await submit_all(nc, specs[chunk:chunk + 200])
    await wait_all_final(events, job_ids, timeout=400)
    # one placement a job in the event stream (two tries at one job, a woken one and its own event, publish
    # one event id: JetStream stores the first)
    placed = Counter(event["data"]["job_id"] for _, event in await read_stream(nc, SUBJECTS.job_event(kind="placed")))
    assert set(placed) == set(job_ids) and set(placed.values()) == {1}
    # fresh heartbeats, sent after the batch: no dispatch ever waited at a site, and every GPU is back
    beats.clear()

    async def every_site_reported() -> None:
        while set(beats) != set(SITE_COUNTRY):
            await asyncio.sleep(0.05)
    await asyncio.wait_for(every_site_reported(), 10)
    assert all(beat["waited_total"] == 0 for beat in beats.values()), beats
    assert all(g["free"] == g["total"] for beat in beats.values() for g in beat["gpus"].values())
    await nc.close()
