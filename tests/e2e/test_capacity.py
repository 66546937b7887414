"""Capacity through the running system: saturation with hysteresis, a lost site's jobs placed elsewhere and
not run twice when it comes back, carbon from the data file."""

from __future__ import annotations

import asyncio
import csv
import signal
import time
from datetime import datetime

import pytest

from shared.bus import request_json
from shared.carbon import default_carbon
from tests.conftest import SUBJECTS, listen
from tests.e2e.harness import FAST, connect_when_up, record_when, start_system

pytestmark = pytest.mark.e2e
INTERVAL_S = float(FAST["CONTINUUM_HEARTBEAT_INTERVAL_S"])
GRACE_S = 2.0


@pytest.fixture
def system(nats_server, tmp_path, request):
    """`up` with fr-a's agent left out: the test runs that one itself, to kill and restart it."""
    grace = getattr(request, "param", GRACE_S)
    yield from start_system(nats_server, tmp_path, "capacity_sites.yaml", "tenants.yaml", ("--remote-site", "fr-a"),
                            CONTINUUM_LOST_JOB_GRACE_S=str(grace))


@pytest.fixture
async def client(system):
    agent = system.start_agent("fr-a")
    nc = await connect_when_up(system)
    events = await listen(nc)
    yield nc, events, agent
    await nc.close()


def spec(residency: str, runtime: float = 600, **extra) -> dict:
    return {"tenant": "startup", "command": ["train"], "resources": {"gpus": 1, "gpu_type": "H100"},
            "walltime_s": 3600, "residency": residency, "objective": "carbon",
            "labels": {"sim.runtime_s": str(runtime)}, **extra}


async def submit(nc, body: dict) -> str:
    reply = await request_json(nc, SUBJECTS.jobs_submit, body)
    assert reply["state"] == "accepted", reply
    return reply["job_id"]


async def site(nc, site_id: str, condition=lambda s: True, timeout: float = 20) -> dict:
    """The site's status from `sites.list`, once it meets the condition."""
    deadline = time.monotonic() + timeout
    while True:
        status = next(s for s in (await request_json(nc, SUBJECTS.sites_list, {}))["sites"] if s["site_id"] == site_id)
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"{site_id} never met the condition; last: {status}"
        await asyncio.sleep(0.05)


def site_events(events, site_id: str) -> list[str]:
    return [e["type"].rsplit(".", 1)[-1] for e in events.events
            if e["type"].startswith("continuum.site.") and e["subject"] == site_id]


async def test_saturation_flips_only_across_its_thresholds(client):
    nc, events, _ = client
    flips = []

    def saturation() -> list[str]:
        return [k for k in site_events(events, "nl") if k in ("saturated", "unsaturated")]

    async def step(free: int, expect: list[str]) -> None:
        """Once capacity has seen `free` H100 free at nl, the saturation events so far are `expect`."""
        await site(nc, "nl", lambda s: s["gpus"]["H100"]["free"] == free)
        await events.wait_for(lambda: len(saturation()) >= len(expect), 10, f"site events {expect}")
        assert saturation() == expect, f"at {free} free"

    jobs = [await submit(nc, spec("NL")) for _ in range(8)]
    await step(0, flips := ["saturated"])  # 0 of 8 free: at most 5 %
    await request_json(nc, SUBJECTS.jobs_cancel, {"job_id": jobs.pop()})
    await step(1, flips)  # 1 free, 12.5 %: below the 20 % to leave saturation
    await request_json(nc, SUBJECTS.jobs_cancel, {"job_id": jobs.pop()})
    await step(2, flips := [*flips, "unsaturated"])  # 25 %
    jobs.append(await submit(nc, spec("NL")))
    await step(1, flips)  # 12.5 %: above the 5 % to enter it again
    jobs.append(await submit(nc, spec("NL")))
    await step(0, flips := [*flips, "saturated"])
    for job_id in jobs[:2]:
        await request_json(nc, SUBJECTS.jobs_cancel, {"job_id": job_id})
    await step(2, flips := [*flips, "unsaturated"])
    # and nothing more while it stays there: two more heartbeats change nothing
    seen = (await site(nc, "nl"))["last_seen"]
    await site(nc, "nl", lambda s: s["last_seen"] > seen)
    seen = (await site(nc, "nl"))["last_seen"]
    await site(nc, "nl", lambda s: s["last_seen"] > seen)
    assert saturation() == ["saturated", "unsaturated", "saturated", "unsaturated"]
    status = await site(nc, "nl")
    assert status["state"] == "up" and not status["saturated"] and status["running"] == 6
    assert status["est_wait_s"] == 0


async def test_carbon_is_the_data_files_for_the_sites_zone_and_hour(client):
    nc, _, _ = client
    with open(default_carbon.__module__.replace(".", "/").rsplit("/", 1)[0] + "/data/"
              "carbon_intensity_2022_eu_hourly.csv", newline="") as f:
        rows = {row["datetime_utc"]: row for row in csv.DictReader(f)}
    for site_id, zone in (("fr-b", "FR"), ("nl", "NL")):
        status = await site(nc, site_id)
        seen = datetime.fromisoformat(status["last_seen"])
        row = rows[seen.replace(year=2022).strftime("%Y-%m-%d %H:00")]
        assert status["carbon_g_per_kwh"] == float(row[zone]), (site_id, seen)
    assert (await site(nc, "fr-a"))["carbon_g_per_kwh"] == 1  # the catalog's fixed value


def agent_events_after(events, site_id: str, after: int) -> list[dict]:
    return [e for e in events.events[after:] if e["source"] == f"continuum/agent/{site_id}"]


def placements(events, job_id: str) -> list[tuple[str, int]]:
    return [(e["data"]["site"], e["data"]["attempt"]) for e in events.by_job[job_id] if e["type"].endswith(".placed")]


async def test_a_lost_site_goes_down_its_jobs_run_elsewhere_and_none_twice(client, system):
    nc, events, agent = client
    running = [await submit(nc, spec("FR", runtime=4)) for _ in range(4)]
    await events.wait_for(lambda: all("started" in events.kinds(j) for j in running), 20, "jobs started at fr-a")
    assert all(placements(events, j) == [("fr-a", 0)] for j in running)

    agent.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    agent.wait()
    # placed at fr-a before anyone knows it is gone: dispatched to an agent that is not there
    unstarted = [await submit(nc, spec("FR", runtime=1)) for _ in range(3)]
    await events.wait_for(lambda: "down" in site_events(events, "fr-a"), 10, "fr-a down")
    down_after = time.monotonic() - killed_at
    # no heartbeat for 3 intervals, found by a sweep run 4 times an interval (and a little time to publish)
    assert down_after <= 3.25 * INTERVAL_S + 0.5, down_after
    assert all(placements(events, j)[0] == ("fr-a", 0) for j in unstarted)

    # not started: placed again at once; running: after the grace period; all in France, where they must be
    everyone = running + unstarted
    await events.wait_for(lambda: all(len(placements(events, j)) == 2 for j in everyone), 20, "placed again")
    assert all(placements(events, j)[1] == ("fr-b", 1) for j in everyone)
    for job_id in running:
        requeued = next(e for e in events.by_job[job_id] if e["type"].endswith(".requeued"))["data"]
        assert requeued["site"] == "fr-a" and "while the job ran there" in requeued["reason"]
        assert requeued["attempt"] == 1
    sweep_left = len(events.events)

    agent = system.start_agent("fr-a")
    await events.wait_for(lambda: site_events(events, "fr-a")[-1:] == ["up"], 20, "fr-a up again")
    await events.wait_for(lambda: all(j in events.billed for j in everyone), 30, "every job ends and is billed")
    for job_id in everyone:
        kinds = events.kinds(job_id)
        # started once at fr-a if it was running there when the agent died, then once at fr-b
        assert kinds.count("started") == (2 if job_id in running else 1), (job_id, kinds)
        assert kinds.count("succeeded") == 1, (job_id, kinds)
        record = await record_when(nc, job_id, "succeeded")  # the registry follows the events
        assert record["state"] == "succeeded" and record["site"] == "fr-b" and record["attempt"] == 1
    # the restarted agent ran none of them: it skipped the dispatches its predecessor never got to
    assert [e for e in agent_events_after(events, "fr-a", sweep_left) if e["data"].get("job_id") in everyone] == []
    status = await site(nc, "fr-a", lambda s: s["state"] == "up")
    assert status["running"] == 0 and status["gpus"]["H100"]["free"] == 16
    # and fr-a takes new work again
    fresh = await submit(nc, spec("FR", runtime=0))
    await events.wait_for(lambda: fresh in events.billed, 20, "a new job at fr-a")
    assert placements(events, fresh) == [("fr-a", 0)]


@pytest.mark.parametrize("system", [600.0], indirect=True)
async def test_an_agent_that_restarts_at_once_gives_back_what_it_lost(client, system):
    """Restarted before anyone saw it down (as a supervisor does): its new start tells routing that the
    jobs it ran are gone, long before the grace period would."""
    nc, events, agent = client
    jobs = [await submit(nc, spec("FR", runtime=2)) for _ in range(3)]
    await events.wait_for(lambda: all("started" in events.kinds(j) for j in jobs), 20, "jobs started at fr-a")
    ups = site_events(events, "fr-a").count("up")
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    system.start_agent("fr-a")
    await events.wait_for(lambda: site_events(events, "fr-a").count("up") > ups, 20, "fr-a up, restarted")
    await events.wait_for(lambda: all(j in events.billed for j in jobs), 30, "every job ends and is billed")
    for job_id in jobs:
        requeued = next(e for e in events.by_job[job_id] if e["type"].endswith(".requeued"))["data"]
        assert "restarted and lost the job" in requeued["reason"]
        assert events.kinds(job_id).count("succeeded") == 1
        # placed again elsewhere: fr-a lost it recently
        assert placements(events, job_id) == [("fr-a", 0), ("fr-b", 1)]


@pytest.mark.parametrize("system", [600.0], indirect=True)
async def test_a_job_cancelled_while_its_site_is_down_stays_cancelled(client, system):
    """Within the grace period a down site keeps its running jobs; a cancel then ends the job at once, and
    the agent's return gives back only the others (it lost them with its restart)."""
    nc, events, agent = client
    jobs = [await submit(nc, spec("FR", runtime=1)) for _ in range(3)]
    await events.wait_for(lambda: all("started" in events.kinds(j) for j in jobs), 20, "jobs started at fr-a")
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    await events.wait_for(lambda: "down" in site_events(events, "fr-a"), 10, "fr-a down")
    cancelled, *others = jobs
    reply = await request_json(nc, SUBJECTS.jobs_cancel, {"job_id": cancelled, "reason": "no longer needed"})
    assert reply["state"] == "cancelled"
    assert all(events.kinds(j)[-1] == "started" for j in others)  # waiting out the grace period

    system.start_agent("fr-a")
    await events.wait_for(lambda: all(j in events.billed for j in others), 30, "the others run again and end")
    for job_id in others:
        assert placements(events, job_id) == [("fr-a", 0), ("fr-b", 1)]
    record = await record_when(nc, cancelled, "cancelled")
    assert record["state"] == "cancelled" and placements(events, cancelled) == [("fr-a", 0)]
