"""The live system and the replay agree: a small trace, its jobs placed one after another (each alone in the
system, so that timing cannot change the answer), runs through `continuum up` on simulated sites and through
`replay`; each job goes to the same site, with the same cost, allocation hours, energy and CO2e.

The replay's answer is the expected one. The only difference allowed is the one the live run measures: a
simulated site runs a job its `sim.runtime_s` and a few milliseconds more (the moment between taking its GPUs
and its run's end being read), where the replay runs it its trace runtime exactly. Rating is linear in a run's
duration at a fixed grid intensity, so each live figure must be the replay's, stretched by the job's own
measured run / trace runtime, to the rating's rounding.
"""

from __future__ import annotations

import math
from datetime import datetime

import pytest
import yaml

from services.replay.engine import replay
from services.replay.traces import TraceJob
from shared.bus import request_json
from shared.carbon import default_carbon
from shared.contracts.catalog import Catalog
from tests.conftest import SUBJECTS, listen
from tests.e2e.harness import connect_when_up, start_system

pytestmark = pytest.mark.e2e

# A second of the test stands for an hour: prices and GPU draws are an hour's, per second, so that jobs of a
# few seconds cost euros and emit kilograms (well above the rating's rounding to 1e-6, and the policy's
# rounding of its score parts to 1e-4) in the same proportions as hour-long jobs would.
HOUR = 3600
WATTS = {"H100": 700 * HOUR, "A100": 400 * HOUR, "L40S": 350 * HOUR}
# Every grid intensity is fixed: the wall-clock hour the test runs at cannot change a placement or a figure.
SITES = [
    # public: the lab's allocation, too small for 8 GPUs
    {"id": "hpc-fr", "kind": "public_hpc", "country": "FR", "jurisdiction": "EU", "carbon_g_per_kwh": 60,
     "gpus": {"A100": 6}, "allocation_factor": {"A100": 2.0}},
    # the only French paid site: where residency FR must go
    {"id": "cloud-fr", "kind": "private_cloud", "country": "FR", "jurisdiction": "EU", "carbon_g_per_kwh": 60,
     "gpus": {"H100": 8}, "price_eur_per_gpu_hour": {"H100": 3.0 * HOUR}},
    # a little dearer, far greener: the balanced objective's choice among paid sites
    {"id": "cloud-se", "kind": "private_cloud", "country": "SE", "jurisdiction": "EU", "carbon_g_per_kwh": 20,
     "gpus": {"H100": 12}, "price_eur_per_gpu_hour": {"H100": 3.2 * HOUR}},
    # cheap and dirty, and the only one with 16 GPUs
    {"id": "cloud-pl", "kind": "private_cloud", "country": "PL", "jurisdiction": "EU", "carbon_g_per_kwh": 700,
     "gpus": {"L40S": 16}, "price_eur_per_gpu_hour": {"L40S": 1.0 * HOUR}},
]
TENANTS = [
    {"id": "lab", "allocation_gpu_hours": 1000, "monthly_budget_eur": 10_000},
    {"id": "startup", "monthly_budget_eur": 10_000},
    {"id": "media", "residency": "FR", "monthly_budget_eur": 10_000},
]
USERS = {"ana": "lab", "ben": "startup", "cleo": "media"}  # trace user -> tenant
# (user, GPUs, runtime in seconds): fractional runtimes, so that a live run a few ms longer stays within the
# walltime both sides give it (the next whole second). Each site can hold every job the trace sends there at
# once: a job finds room even should the GPUs of the one before be given back after it is placed.
TRACE = [
    ("ana", 2, 1.5),    # public first: hpc-fr
    ("ben", 4, 2.5),    # no allocation: the best paid site, cloud-se
    ("cleo", 2, 1.5),   # residency FR: cloud-fr
    ("ana", 8, 1.5),    # more GPUs than the public site has: paid, cloud-se
    ("ben", 16, 1.5),   # only cloud-pl has 16
    ("ana", 4, 2.5),    # public again: hpc-fr
]
# the rating rounds every figure to 1e-6, the live one and the replay's each once
ROUNDING = 2e-6


@pytest.fixture
def catalog_files(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    sites, tenants = folder / "sites.yaml", folder / "tenants.yaml"
    sites.write_text(yaml.safe_dump({"sites": [
        {**s, "backend": "simulated", "gpu_watts": {t: WATTS[t] for t in s["gpus"]}} for s in SITES]}))
    tenants.write_text(yaml.safe_dump({"tenants": TENANTS}))
    return sites, tenants


@pytest.fixture
def system(nats_server, tmp_path, catalog_files):
    sites, tenants = catalog_files  # absolute paths: the harness's catalog folder is not used
    yield from start_system(nats_server, tmp_path, str(sites), str(tenants))


def event(events, job_id: str, kind: str) -> dict:
    return next(e for e in events.by_job[job_id] if e["type"].endswith("." + kind))


async def test_each_job_goes_to_the_same_site_at_the_same_cost_and_co2e_live_and_in_replay(system, catalog_files):
    nc = await connect_when_up(system)
    events = await listen(nc)

    # live: each job submitted once the one before has ended and been billed
    job_ids: list[str] = []
    for n, (user, gpus, runtime) in enumerate(TRACE):
        reply = await request_json(nc, SUBJECTS.jobs_submit, {
            "tenant": USERS[user], "name": f"trace-{n}", "command": ["replay"], "walltime_s": math.ceil(runtime),
            "resources": {"gpus": gpus, "gpu_type": "any"}, "labels": {"sim.runtime_s": str(runtime)}})
        assert reply["state"] == "accepted", reply
        job_id = reply["job_id"]
        job_ids.append(job_id)
        await events.wait_for(lambda j=job_id: j in events.billed or "rejected" in events.kinds(j), 30,
                              f"trace job {n} to end and be billed")
        assert events.kinds(job_id)[-1] == "succeeded", (n, events.kinds(job_id))
    lines = {}
    for tenant in sorted({USERS[user] for user, _, _ in TRACE}):
        statement = await request_json(nc, SUBJECTS.billing_statement, {"tenant": tenant})
        lines.update({line["job_id"]: line for line in statement["lines"]})
    await nc.close()
    assert set(lines) == set(job_ids)

    # the replay: the same jobs, arriving when they were submitted, from the first submission on
    submitted = [datetime.fromisoformat(event(events, j, "accepted")["time"]) for j in job_ids]
    trace = [TraceJob(job_id=f"trace-{n}", user=user, submit_s=(at - submitted[0]).total_seconds(),
                      runtime_s=runtime, gpus=gpus)
             for n, ((user, gpus, runtime), at) in enumerate(zip(TRACE, submitted, strict=True))]
    outcomes = replay(trace, Catalog.load(*catalog_files), default_carbon(), "continuum", submitted[0], USERS)

    for n, (job_id, job, out) in enumerate(zip(job_ids, trace, outcomes, strict=True)):
        placed, line = event(events, job_id, "placed")["data"], lines[job_id]
        assert (placed["site"], placed["gpu_type"], placed.get("overflow", False)) == \
            (out.site, out.gpu_type, out.overflow), f"trace job {n}: placed live, in the replay {out.reason or 'too'}"
        assert out.start_s == job.submit_s, f"trace job {n} waited in the replay: the trace is not sequential"
        assert (line["site"], line["gpu_type"], line["gpus"]) == (out.site, out.gpu_type, out.gpus)
        # the live run's length, measured, against the trace's: the simulated site runs a job at least its
        # runtime (by the clock it is billed by), and no more than the reporting of its start adds
        ran_s = (datetime.fromisoformat(line["ended_at"]) - datetime.fromisoformat(line["started_at"])).total_seconds()
        stretch = ran_s / (out.end_s - out.start_s)
        assert 1.0 - 1e-3 <= stretch < 1.1, f"trace job {n} ran {ran_s:.3f} s for a runtime of {job.runtime_s} s"
        for live, replayed in (("amount_eur", out.cost_eur), ("allocation_hours", out.allocation_hours),
                               ("energy_kwh", out.energy_kwh), ("co2e_kg", out.co2e_kg)):
            assert line[live] == pytest.approx(replayed * stretch, rel=1e-9, abs=ROUNDING), \
                f"trace job {n} at {out.site}: {live} {line[live]} live, {replayed} in the replay (x {stretch:.5f})"
    # the agreement means something: the jobs went to different sites, for different reasons, and cost
    assert {out.site for out in outcomes} == {s["id"] for s in SITES}
    assert all(out.co2e_kg > 0.01 for out in outcomes)
    assert sum(out.cost_eur for out in outcomes) > 1 and sum(out.allocation_hours for out in outcomes) > 0
