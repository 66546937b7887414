"""services/capacity: the wait forecast, what it learns from observed waits, saturation and site events."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.capacity.forecast import Load, WaitLearner, estimate, raw_wait
from services.capacity.view import SiteTracker, is_saturated, site_changes
from shared.contracts.catalog import SiteEntry
from shared.contracts.sites import GpuCount, Heartbeat, SiteJob, SiteStatus, WaitModel

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SITE = SiteEntry(id="s", kind="private_cloud", country="FR", jurisdiction="EU", carbon_g_per_kwh=50,
                 backend="simulated", gpus={"H100": 4}, price_eur_per_gpu_hour={"H100": 2.0})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# raw_wait: the queue run out at full walltime

def test_free_gpus_mean_no_wait():
    assert raw_wait(Load({"H100": 2}), "H100", 2) == 0


def test_a_job_waits_for_the_running_job_that_ends_first():
    load = Load({"H100": 0}, running=(("H100", 1, 300.0), ("H100", 1, 100.0)))
    assert raw_wait(load, "H100", 1) == 100
    assert raw_wait(load, "H100", 2) == 300


def test_the_queue_ahead_goes_first_in_order():
    # 1 free; the queue holds a 2-GPU job of 50 s then a 1-GPU job of 70 s; one running job ends in 10 s
    load = Load({"H100": 1}, running=(("H100", 1, 10.0),), queue=(("H100", 2, 50.0), ("H100", 1, 70.0)))
    # the 2-GPU job starts at 10 and holds both until 60; the 1-GPU job then starts at 60 on a freed GPU
    assert raw_wait(load, "H100", 1) == 60
    assert raw_wait(load, "H100", 2) == 130  # after the 70 s job started at 60 ends, with the other GPU


def test_strict_order_across_gpu_types():
    # a blocked L4 head holds back an H100 job behind it, as the agents' backends do
    load = Load({"H100": 1, "L4": 0}, running=(("L4", 1, 40.0),), queue=(("L4", 1, 10.0),))
    assert raw_wait(load, "H100", 1) == 40


def test_more_gpus_than_the_site_has_never_start():
    assert math.isinf(raw_wait(Load({"H100": 4}), "H100", 5))
    assert math.isinf(raw_wait(Load({"H100": 4}), "A100", 1))


def test_later_ages_running_jobs_and_queues_arrivals():
    load = Load({"H100": 0}, running=(("H100", 1, 100.0),))
    arrival = SiteJob(job_id="a", gpu_type="H100", gpus=1, walltime_s=30, queued_at=at(0))
    aged = load.later(40, [arrival])
    assert aged.running == (("H100", 1, 60.0),)
    assert raw_wait(aged, "H100", 1) == 90  # 60 s until the GPU frees, 30 s for the arrival ahead


@given(st.lists(st.tuples(st.integers(1, 4), st.floats(1, 1000)), max_size=8),
       st.lists(st.tuples(st.integers(1, 4), st.floats(1, 1000)), max_size=8), st.integers(1, 4))
def test_waits_grow_with_the_queue(running, queue, need):
    # a job that joins behind one more queued job never starts earlier
    used = sum(n for n, _ in running)
    load = Load({"H100": max(0, 8 - used)}, running=tuple(("H100", n, s) for n, s in running),
                queue=tuple(("H100", n, s) for n, s in queue))
    longer = Load(load.free, load.running, (*load.queue, ("H100", need, 5.0)))
    assert raw_wait(longer, "H100", need) >= raw_wait(load, "H100", need)


# WaitLearner: the correction from observed waits

def test_without_samples_the_model_is_the_prior():
    prior = WaitModel(start_latency_s=3, walltime_factor=0.5)
    assert WaitLearner(prior).model() == prior
    assert WaitLearner().model() == WaitModel(start_latency_s=0, walltime_factor=1, samples=0)


def test_learns_start_latency_and_walltime_factor():
    learner = WaitLearner()
    for actual in (2.0, 3.0, 4.0):  # jobs forecast to start at once took 2-4 s
        learner.observe(0, actual)
    for raw in (100.0, 200.0, 400.0):  # queued jobs waited 3 s plus 40 % of their raw forecast
        learner.observe(raw, 3 + 0.4 * raw)
    model = learner.model()
    assert model.start_latency_s == 3
    assert model.walltime_factor == pytest.approx(0.4)
    assert model.samples == 6
    assert estimate(model, 1000) == pytest.approx(403)


def test_the_factor_is_bounded_and_infinite_forecasts_are_ignored():
    learner = WaitLearner()
    learner.observe(100, 0)
    learner.observe(math.inf, 50)
    assert learner.model().walltime_factor == 0.05
    assert learner.model().samples == 1


def test_only_the_latest_samples_count():
    learner = WaitLearner(window=3)
    for _ in range(3):
        learner.observe(100, 100)
    for _ in range(3):
        learner.observe(100, 20)
    assert learner.model().walltime_factor == pytest.approx(0.2)


# saturation: hysteresis

def gpus(free: int, total: int = 20) -> dict[str, GpuCount]:
    return {"H100": GpuCount(total=total, free=free)}


def test_saturation_has_hysteresis():
    seen, was = [], False
    # fill to 1 free (5 %), free 2 (10 %: still saturated), 4 (20 %: not), then 3 (15 %: still not), fill again
    for free in (10, 2, 1, 2, 3, 4, 3, 2, 1, 0):
        was = is_saturated(was, gpus(free), queued=0)
        seen.append(was)
    assert seen == [False, False, True, True, True, False, False, False, True, True]


def test_a_queue_at_the_site_keeps_it_saturated():
    assert is_saturated(True, gpus(10), queued=1)
    assert not is_saturated(True, gpus(10), queued=0)
    assert not is_saturated(False, gpus(0, total=0), queued=5)


# SiteTracker and site events

def beat(seconds: float, jobs: list[SiteJob], free: int, since: datetime = T0) -> Heartbeat:
    return Heartbeat(site_id="s", time=at(seconds), interval_s=1, gpus={"H100": GpuCount(total=4, free=free)},
                     queued=sum(1 for j in jobs if j.started_at is None),
                     running=[j.job_id for j in jobs if j.started_at], since=since, jobs=jobs)


def job(job_id: str, queued: float, started: float | None = None, walltime: float = 100) -> SiteJob:
    return SiteJob(job_id=job_id, gpu_type="H100", gpus=4, walltime_s=walltime, queued_at=at(queued),
                   started_at=at(started) if started is not None else None)


def test_tracker_learns_from_a_job_that_arrived_behind_a_running_one():
    tracker = SiteTracker(SITE)
    tracker.observe(beat(0, [job("a", 0, 0, walltime=100)], free=0))
    # b arrives at 10 s: the forecast then is a's remaining 90 s; b really starts at 46 s, when a ended
    tracker.observe(beat(20, [job("a", 0, 0), job("b", 10)], free=0))
    assert tracker.forecasts == {("b", 0): 90}
    tracker.observe(beat(50, [job("b", 10, 46)], free=0))
    model = tracker.learner.model()
    assert model.samples == 1 and model.walltime_factor == pytest.approx(36 / 90)
    assert tracker.forecasts == {}


def test_tracker_learns_nothing_across_an_agent_restart():
    tracker = SiteTracker(SITE)
    tracker.observe(beat(0, [], free=4))
    tracker.observe(beat(5, [job("a", 1, 2)], free=0, since=at(1)))
    assert tracker.learner.model().samples == 0


def test_tracker_status_forecasts_a_1_gpu_job():
    tracker = SiteTracker(SITE, SiteStatus(site_id="s", kind="k", country="FR", state="up", gpus={},
                                           carbon_g_per_kwh=1, price_eur_per_gpu_hour={},
                                           wait_model=WaitModel(start_latency_s=1, walltime_factor=0.5)))
    b = beat(0, [job("a", 0, 0, walltime=100)], free=0)
    status = tracker.status(b, carbon_g_per_kwh=42, was_saturated=False)
    assert status.est_wait_s_by_type == {"H100": 51.0}  # 1 + 0.5 x 100
    assert status.est_wait_s == 51.0 and status.saturated and status.carbon_g_per_kwh == 42
    assert status.since == T0 and status.running == 1


def test_site_changes():
    up = SiteStatus(site_id="s", kind="k", country="FR", state="up", gpus={}, carbon_g_per_kwh=1,
                    price_eur_per_gpu_hour={}, since=T0)
    assert site_changes(None, up) == ["up"]
    assert site_changes(up, up) == []
    assert site_changes(up.model_copy(update={"state": "down"}), up) == ["up"]
    assert site_changes(up.model_copy(update={"since": at(-60)}), up) == ["up"]  # the agent restarted
    saturated = up.model_copy(update={"saturated": True})
    assert site_changes(up, saturated) == ["saturated"]
    assert site_changes(saturated, up) == ["unsaturated"]
