"""services/billing/rating.py: one job's cost in euros, allocation hours, energy and carbon, checked by hand."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.billing.rating import hourly_slices, rate, statement
from shared.carbon import default_carbon, site_intensity
from shared.contracts.catalog import SiteEntry

START = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)

PAID = SiteEntry(id="paid", kind="private_cloud", country="FR", jurisdiction="EU", carbon_g_per_kwh=50.0, pue=1.25,
                 gpus={"H100": 8, "L4": 8}, gpu_watts={"H100": 700.0},
                 price_eur_per_gpu_hour={"H100": 2.87, "L4": 0.79})
PUBLIC = SiteEntry(id="public", kind="public_hpc", country="FR", jurisdiction="EU", carbon_g_per_kwh=50.0, pue=1.2,
                   gpus={"H100": 16, "A100": 32}, price_eur_per_gpu_hour={"H100": 0.0, "A100": 0.0},
                   allocation_factor={"H100": 4.0})


def flat(value: float = 0.0):
    return lambda at: value


def run(site: SiteEntry, gpu_type: str, gpus: int, start: datetime, end: datetime, intensity=None, job_id="j1"):
    return rate(site, job_id=job_id, tenant="acme", gpu_type=gpu_type, gpus=gpus, started_at=start, ended_at=end,
                state="succeeded", intensity=intensity or flat())


def test_paid_site_amount_is_gpus_times_hours_times_price():
    line = run(PAID, "H100", 2, START, START + timedelta(hours=1.5))
    assert line.seconds == 5400.0
    assert line.gpu_hours == pytest.approx(3.0)
    assert line.amount_eur == pytest.approx(2 * 1.5 * 2.87)  # 8.61
    assert line.amount_eur == pytest.approx(8.61)
    assert line.allocation_hours == 0.0  # paid capacity uses no public hours
    assert (line.site, line.tenant, line.gpu_type, line.gpus, line.state) == ("paid", "acme", "H100", 2, "succeeded")


def test_public_site_counts_allocation_hours_with_the_factor():
    line = run(PUBLIC, "H100", 2, START, START + timedelta(hours=1.5))
    assert line.amount_eur == 0.0
    assert line.allocation_hours == pytest.approx(2 * 1.5 * 4.0)  # 12 allocation hours


def test_public_site_without_a_factor_counts_gpu_hours_one_for_one():
    line = run(PUBLIC, "A100", 3, START, START + timedelta(minutes=40))
    assert line.allocation_hours == pytest.approx(3 * 40 / 60)  # 2.0


def test_energy_is_watts_times_gpus_times_hours_times_pue():
    line = run(PAID, "H100", 2, START, START + timedelta(hours=1.5))
    assert line.energy_kwh == pytest.approx(700 * 2 * 1.5 * 1.25 / 1000)  # 2.625 kWh


def test_energy_uses_the_default_board_power_when_the_site_gives_none():
    line = run(PAID, "L4", 4, START, START + timedelta(hours=2))
    assert line.energy_kwh == pytest.approx(72 * 4 * 2 * 1.25 / 1000)  # L4 default 72 W: 0.72 kWh
    assert line.amount_eur == pytest.approx(4 * 2 * 0.79)


def test_carbon_follows_the_intensity_of_each_hour_the_job_crosses():
    # 10:40 -> 11:10 UTC, one H100 (700 W) at PUE 1.25: 0.875 kW
    # intensity 120 g/kWh during 10:xx, 480 g/kWh during 11:xx
    def intensity(at: datetime) -> float:
        return {10: 120.0, 11: 480.0}[at.astimezone(UTC).hour]

    start = START.replace(minute=40)
    line = run(PAID, "H100", 1, start, start + timedelta(minutes=30), intensity=intensity)
    # 20 minutes at 120: 0.875 kW * 1/3 h * 120 = 35 g; 10 minutes at 480: 0.875 kW * 1/6 h * 480 = 70 g
    assert line.co2e_kg == pytest.approx(0.105)
    assert line.energy_kwh == pytest.approx(0.875 * 0.5)
    # a flat intensity would have given a different figure: the hour boundary matters
    flat_line = run(PAID, "H100", 1, start, start + timedelta(minutes=30), intensity=flat(120.0))
    assert flat_line.co2e_kg == pytest.approx(0.0525)


def test_carbon_inside_one_hour_uses_one_value():
    line = run(PAID, "H100", 2, START, START + timedelta(minutes=30), intensity=flat(200.0))
    # 700 W * 2 * 1.25 = 1.75 kW, half an hour: 0.875 kWh at 200 g = 175 g
    assert line.co2e_kg == pytest.approx(0.175)


def test_hourly_slices_cut_at_each_clock_hour():
    start = START.replace(minute=45)
    slices = list(hourly_slices(start, start + timedelta(hours=2)))
    assert [(at.hour, at.minute) for at, _ in slices] == [(10, 45), (11, 0), (12, 0)]
    assert [h for _, h in slices] == pytest.approx([0.25, 1.0, 0.75])


def test_an_empty_or_reversed_interval_costs_nothing():
    for end in (START, START - timedelta(minutes=5)):
        line = run(PAID, "H100", 2, START, end, intensity=flat(300.0))
        assert (line.seconds, line.gpu_hours, line.amount_eur, line.energy_kwh, line.co2e_kg) == (0, 0, 0, 0, 0)


def test_a_gpu_type_the_site_does_not_offer_costs_nothing_and_draws_nothing():
    line = run(PAID, "A100", 2, START, START + timedelta(hours=1), intensity=flat(300.0))
    assert line.gpu_hours == pytest.approx(2.0)
    assert line.amount_eur == 0.0
    assert line.energy_kwh == 0.0
    assert line.co2e_kg == 0.0


def test_statement_totals_equal_the_sum_of_its_lines():
    lines = [
        run(PAID, "H100", 2, START, START + timedelta(hours=1.5), intensity=flat(100.0), job_id="a"),
        run(PUBLIC, "H100", 4, START, START + timedelta(hours=3), intensity=flat(60.0), job_id="b"),
        run(PAID, "L4", 1, START, START + timedelta(minutes=20), intensity=flat(400.0), job_id="c"),
    ]
    result = statement("acme", lines, since=START, until=START + timedelta(days=1))
    assert result.tenant == "acme"
    assert result.lines == lines
    assert (result.since, result.until) == (START, START + timedelta(days=1))
    for field in ("gpu_hours", "amount_eur", "allocation_hours", "energy_kwh", "co2e_kg"):
        assert getattr(result.totals, field) == pytest.approx(sum(getattr(line, field) for line in lines)), field
    assert result.totals.amount_eur == pytest.approx(8.61 + 0.79 / 3)
    assert result.totals.allocation_hours == pytest.approx(4 * 3 * 4.0)


def test_an_empty_statement_is_all_zeros():
    result = statement("acme", [])
    assert result.lines == []
    assert result.totals.model_dump() == {"gpu_hours": 0, "amount_eur": 0, "allocation_hours": 0, "energy_kwh": 0,
                                          "co2e_kg": 0}


def test_carbon_of_a_run_across_an_hour_uses_the_data_files_two_hours():
    # FR on 14 July at 15:00 and 16:00 UTC, read from the shipped file by hand, not through the provider
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "carbon_intensity_2022_eu_hourly.csv"
    with path.open(newline="") as f:
        rows = {row["datetime_utc"]: float(row["FR"]) for row in csv.DictReader(f)}
    first, second = rows["2022-07-14 15:00"], rows["2022-07-14 16:00"]
    assert first != second
    site = PAID.model_copy(update={"carbon_g_per_kwh": None, "carbon_zone": "FR"})
    start = datetime(2026, 7, 14, 15, 45, tzinfo=UTC)  # 15 minutes in the first hour, 30 in the second
    line = run(site, "H100", 2, start, start + timedelta(minutes=45),
               intensity=lambda at: site_intensity(site, at, default_carbon()))
    kw = 2 * 0.7 * 1.25  # two H100 at 700 W, PUE 1.25
    assert line.energy_kwh == pytest.approx(kw * 0.75)
    assert line.co2e_kg == pytest.approx((kw * 0.25 * first + kw * 0.5 * second) / 1000, abs=1e-6)
    assert line.amount_eur == pytest.approx(2 * 0.75 * 2.87)
