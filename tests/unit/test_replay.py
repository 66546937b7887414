"""services/replay: the trace readers on real rows of each format, and the engine on hand-made traces whose
waits, costs and CO2e are worked out by hand below."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from services.replay.engine import replay
from services.replay.runner import replay_policies
from services.replay.traces import TraceError, TraceJob, alibaba, detect, philly, swf, tenant_of
from services.routing.policy import greener_hour
from shared.contracts.catalog import Catalog, SiteEntry, TenantEntry

# --- readers -------------------------------------------------------------------------------------------------

PHILLY = """timestamp,duration,num_gpus,gpu_time,cluster
2017-10-09 07:01:55,66.0,1,66.0,11cb48
2017-10-09 06:13:03,2951.0,1,2951.0,6214e9
2017-09-29 07:58:32,860662.0,8,6885296.0,6c71a0
"""
# the Alibaba v2023 pod list's columns; the last pod still runs when the trace ends, one never had a GPU
ALIBABA = """\
name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time
openb-pod-0017,88000,327680,8,1000,V100M32,LS,Succeeded,9437497,10769854,9437497
openb-pod-0022,6000,12288,1,460,,BE,Failed,9437520,9446002,9437521
openb-pod-0030,8000,30720,0,0,,BE,Succeeded,9437600,9437700,9437601
openb-pod-0041,12000,16384,2,1000,G2,LS,Running,10000000,,10000100
"""
# the Standard Workload Format (a line of the PWA's SDSC-SP2 log, one that never ran, a comment)
SWF = """; Version: 2.2
    1          0  15077  14400    128   -1   -1    128  14400   -1  1  1  1  -1  1  -1  -1  -1
    2        120     10     -1     16   -1   -1     16   3600   -1  5  2  1  -1  1  -1  -1  -1
"""


def test_philly_rows_read_with_times_from_the_traces_start():
    jobs = philly(io.StringIO(PHILLY))
    start = datetime(2017, 9, 29, 7, 58, 32, tzinfo=UTC)
    assert jobs[2] == TraceJob("philly-4", "6c71a0", 0.0, 860662.0, 8)
    assert jobs[0].submit_s == (datetime(2017, 10, 9, 7, 1, 55, tzinfo=UTC) - start).total_seconds()
    assert (jobs[0].user, jobs[0].runtime_s, jobs[0].gpus) == ("11cb48", 66.0, 1)


def test_alibaba_pods_with_gpus_only_and_a_running_one_cut_at_the_traces_end():
    jobs = {j.job_id: j for j in alibaba(io.StringIO(ALIBABA))}
    assert set(jobs) == {"openb-pod-0017", "openb-pod-0022", "openb-pod-0041"}
    assert jobs["openb-pod-0017"] == TraceJob("openb-pod-0017", "LS", 9437497.0, 10769854.0 - 9437497.0, 8)
    assert jobs["openb-pod-0022"].gpus == 1  # 460 milli-GPUs: a whole one
    assert jobs["openb-pod-0041"].runtime_s == 10769854.0 - 10000100.0  # running: until the last timestamp


def test_swf_jobs_that_ran_with_processors_as_gpus():
    (job,) = swf(io.StringIO(SWF))
    assert job == TraceJob("swf-1", "user-1", 0.0, 14400.0, 16)  # 128 processors, 8 a GPU


def test_the_format_is_told_from_the_first_line_and_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "trace.csv"
    assert (detect(path, PHILLY), detect(path, ALIBABA), detect(path, SWF)) == ("philly", "alibaba", "swf")
    with pytest.raises(TraceError, match="not a trace this reads"):
        detect(path, "a,b,c\n1,2,3\n")


def test_users_map_to_tenants_the_same_way_every_time_unless_overridden():
    tenants = ["lab", "startup", "media"]
    picks = [tenant_of(f"vc{i}", tenants) for i in range(30)]
    assert picks == [tenant_of(f"vc{i}", list(reversed(tenants))) for i in range(30)]  # catalog order aside
    assert set(picks) == set(tenants)
    assert tenant_of("vc1", tenants, {"vc1": "media"}) == "media"


# --- the engine ----------------------------------------------------------------------------------------------

START = datetime(2022, 3, 1, tzinfo=UTC)
HOUR = 3600.0


def catalog(overflow_after_wait_s: float = 0.0) -> Catalog:
    public = SiteEntry(id="hpc", kind="public_hpc", country="FR", jurisdiction="EU", carbon_g_per_kwh=100, pue=1.0,
                       gpus={"H100": 2}, allocation_factor={"H100": 1.0})
    cloud = SiteEntry(id="cloud", kind="private_cloud", country="SE", jurisdiction="EU", carbon_g_per_kwh=20, pue=1.0,
                      gpus={"H100": 2}, price_eur_per_gpu_hour={"H100": 2.0})
    lab = TenantEntry(id="lab", allocation_gpu_hours=1000, monthly_budget_eur=100,
                      overflow_after_wait_s=overflow_after_wait_s)
    return Catalog(sites={"hpc": public, "cloud": cloud}, tenants={"lab": lab})


class FixedCarbon:
    def intensity(self, zone: str, when: datetime) -> float:  # pragma: no cover: the sites give fixed values
        raise AssertionError("sites with a fixed intensity ask no zone")


def three_jobs() -> list[TraceJob]:
    return [TraceJob(f"j{i}", "team", 0.0, HOUR, 2) for i in range(3)]


def test_public_only_runs_the_jobs_one_after_another_on_public_capacity():
    out = replay(three_jobs(), catalog(), FixedCarbon(), "public-only", START, {"team": "lab"})
    assert [(o.site, o.wait_s) for o in out] == [("hpc", 0.0), ("hpc", HOUR), ("hpc", 2 * HOUR)]
    # 2 GPUs x 700 W x 1 h = 1.4 kWh at 100 g: 0.14 kg; no euros, 2 allocation hours each
    assert [(o.energy_kwh, o.co2e_kg, o.cost_eur, o.allocation_hours) for o in out] == [(1.4, 0.14, 0.0, 2.0)] * 3


def test_overflow_takes_the_paid_site_while_public_capacity_is_busy():
    out = replay(three_jobs(), catalog(), FixedCarbon(), "cheapest", START, {"team": "lab"})
    first, second, third = out
    assert (first.site, first.wait_s, first.overflow) == ("hpc", 0.0, False)
    # public busy for an hour, more than the tenant's threshold (0 s): the paid site, 2 GPUs x 1 h x 2 EUR
    assert (second.site, second.wait_s, second.overflow, second.cost_eur) == ("cloud", 0.0, True, 4.0)
    assert second.co2e_kg == pytest.approx(1.4 * 20 / 1000)
    # both full: the third waits for the first public GPUs back
    assert (third.site, third.wait_s) == ("hpc", HOUR)


def test_public_capacity_first_within_the_tenants_overflow_threshold():
    out = replay(three_jobs(), catalog(overflow_after_wait_s=2 * HOUR), FixedCarbon(), "continuum", START,
                 {"team": "lab"})
    assert [(o.site, o.wait_s) for o in out] == [("hpc", 0.0), ("hpc", HOUR), ("hpc", 2 * HOUR)]


def test_a_greener_hour_within_the_slack_is_waited_for_and_explained():
    grid = {10: 120.0, 11: 110.0, 12: 45.0, 13: 60.0}  # g/kWh by hour of the day
    now = datetime(2022, 3, 1, 10, 20, tzinfo=UTC)
    def intensity(at: datetime) -> float:
        return grid.get(at.hour, 200.0)
    assert greener_hour(now, 3 * HOUR, intensity) == (now.replace(hour=12, minute=0), 45.0, 120.0)
    assert greener_hour(now, HOUR, intensity) is None  # 11:00 saves less than 10 %
    assert greener_hour(now + timedelta(hours=2), 5 * HOUR, intensity) is None  # now is the greenest


def test_the_public_wait_counts_the_jobs_ahead_in_line_so_a_job_behind_them_overflows():
    # threshold 1.5 h: j1 waits for j0's GPUs (1 h); j2 would wait behind j1 too (2 h), so it overflows at once.
    # Counting only the running job, j2's wait would look like 1 h and it would wait 2 h on public capacity
    out = replay(three_jobs(), catalog(overflow_after_wait_s=1.5 * HOUR), FixedCarbon(), "continuum", START,
                 {"team": "lab"})
    assert [(o.site, o.wait_s, o.overflow) for o in out] == [("hpc", 0.0, False), ("hpc", HOUR, False),
                                                             ("cloud", 0.0, True)]
    assert out[2].cost_eur == 4.0  # 2 GPUs x 1 h x 2 EUR


def test_a_job_held_for_public_capacity_is_asked_again_when_one_behind_it_starts_there_first():
    # public 2 GPUs. j0 (1 GPU, 1 h) runs; j1 (2 GPUs) would start on public in 1 h, within the 1.5 h threshold,
    # so it waits. j2 (1 GPU, 3 h) fits in the free GPU and starts: j1's public start moves to 3 h, beyond the
    # threshold, and j1 overflows then, at once
    jobs = [TraceJob("j0", "team", 0.0, HOUR, 1), TraceJob("j1", "team", 0.0, HOUR, 2),
            TraceJob("j2", "team", 0.0, 3 * HOUR, 1)]
    out = replay(jobs, catalog(overflow_after_wait_s=1.5 * HOUR), FixedCarbon(), "continuum", START, {"team": "lab"})
    assert [(o.job_id, o.site, o.wait_s) for o in out] == [("j0", "hpc", 0.0), ("j1", "cloud", 0.0),
                                                           ("j2", "hpc", 0.0)]


def test_carbon_overflows_to_the_greenest_paid_site_and_cheapest_to_the_cheapest():
    base = catalog()
    dirty = SiteEntry(id="dirty", kind="private_cloud", country="PL", jurisdiction="EU", carbon_g_per_kwh=800,
                      pue=1.0, gpus={"H100": 2}, price_eur_per_gpu_hour={"H100": 1.0})
    both = base.model_copy(update={"sites": {**base.sites, "dirty": dirty}})
    cheap = replay(three_jobs()[:2], both, FixedCarbon(), "cheapest", START, {"team": "lab"})
    green = replay(three_jobs()[:2], both, FixedCarbon(), "carbon", START, {"team": "lab"})
    # the second job overflows: 2 GPUs x 700 W x 1 h = 1.4 kWh; 1 EUR and 800 g, or 2 EUR and 20 g a GPU-hour
    assert (cheap[1].site, cheap[1].cost_eur, cheap[1].co2e_kg) == ("dirty", 2.0, pytest.approx(1.12))
    assert (green[1].site, green[1].cost_eur, green[1].co2e_kg) == ("cloud", 4.0, pytest.approx(0.028))


class HourlyCarbon:
    """Zone Z's grid: 120 g/kWh from 10:00 UTC, 45 from 11:00, 200 otherwise."""

    def intensity(self, zone: str, when: datetime) -> float:
        assert zone == "Z"
        return {10: 120.0, 11: 45.0}.get(when.hour, 200.0)


def test_carbon_shift_waits_for_the_greener_hour_within_the_jobs_slack_and_carbon_does_not():
    hpc = SiteEntry(id="hpc", kind="public_hpc", country="FR", jurisdiction="EU", carbon_zone="Z", pue=1.0,
                    gpus={"H100": 1}, allocation_factor={"H100": 1.0})
    one = Catalog(sites={"hpc": hpc}, tenants=catalog().tenants)
    at = START.replace(hour=10, minute=20)
    job = [TraceJob("j", "team", 0.0, HOUR, 1)]
    (now,) = replay(job, one, HourlyCarbon(), "carbon", at, {"team": "lab"})
    (later,) = replay(job, one, HourlyCarbon(), "carbon-shift", at, {"team": "lab"})
    # now: 10:20 to 11:20, 0.7 kWh, two thirds of it at 120 g and a third at 45
    assert (now.wait_s, now.co2e_kg) == (0.0, pytest.approx(0.7 * (2 / 3 * 120 + 1 / 3 * 45) / 1000))
    # a slack of its runtime (1 h): 11:00 is 62 % greener, so it starts then, 40 min later, all at 45 g
    assert (later.wait_s, later.co2e_kg) == (40 * 60.0, pytest.approx(0.7 * 45 / 1000))


def test_policies_replayed_side_by_side_give_what_each_gives_alone():
    jobs = [TraceJob(f"j{i}", "team", i * HOUR / 4, HOUR * (1 + i % 3), 1 + i % 2) for i in range(40)]
    policies = ["public-only", "continuum", "carbon"]
    seen: dict[str, int] = {}
    apart = replay_policies(jobs, catalog(HOUR), policies, START, {"team": "lab"}, workers=2,
                            progress=seen.__setitem__)
    assert list(apart) == policies
    for name in policies:
        assert apart[name] == replay(jobs, catalog(HOUR), FixedCarbon(), name, START, {"team": "lab"}), name
        assert seen[name] == len(jobs)  # each one's progress reached the caller, to its end
    assert apart["public-only"] != apart["continuum"]  # they did not all run one policy
