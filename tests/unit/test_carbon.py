"""shared/carbon.py: hourly grid intensity from the shipped 2022 Electricity Maps data."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.carbon import HourlyCarbon, check_zones, default_carbon
from shared.contracts.catalog import Catalog, CatalogError

ZONES = ["FR", "SE-SE3"]
CSV_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "carbon_intensity_2022_eu_hourly.csv"


def data_rows() -> tuple[list[str], list[list[str]]]:
    with CSV_FILE.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


def row_value(header: list[str], row: list[str], zone: str) -> float:
    return float(row[header.index(zone)])


@pytest.fixture(scope="module")
def carbon() -> HourlyCarbon:
    return HourlyCarbon.load(ZONES)


@pytest.fixture(scope="module")
def csv_data():
    return data_rows()


def test_load_keeps_only_the_zones_asked_for(carbon):
    assert carbon.zones == ["FR", "SE-SE3"]


def test_first_hour_of_2022_is_the_first_data_row(carbon, csv_data):
    header, rows = csv_data
    assert rows[0][0] == "2022-01-01 00:00"
    when = datetime(2022, 1, 1, 0, 30, tzinfo=UTC)
    for zone in ZONES:
        assert carbon.intensity(zone, when) == row_value(header, rows[0], zone)


def test_the_zones_differ(carbon):
    when = datetime(2022, 1, 1, 0, 30, tzinfo=UTC)
    assert carbon.intensity("FR", when) != carbon.intensity("SE-SE3", when)


def test_every_instant_of_an_hour_gets_that_hours_row(carbon, csv_data):
    header, rows = csv_data
    assert rows[5][0] == "2022-01-01 05:00"
    expected = row_value(header, rows[5], "FR")
    for minute, second in ((0, 0), (30, 0), (59, 59)):
        assert carbon.intensity("FR", datetime(2022, 1, 1, 5, minute, second, tzinfo=UTC)) == expected


def test_an_instant_in_another_time_zone_is_read_in_utc(carbon, csv_data):
    header, rows = csv_data
    paris_winter = timezone(timedelta(hours=1))
    # 03:30 in Paris on 1 January is 02:30 UTC: the third row
    assert carbon.intensity("FR", datetime(2022, 1, 1, 3, 30, tzinfo=paris_winter)) == row_value(header, rows[2], "FR")


def test_a_2025_date_maps_to_the_same_hour_of_2022(carbon, csv_data):
    header, rows = csv_data
    when_2022 = datetime(2022, 7, 14, 15, 10, tzinfo=UTC)
    index = int((when_2022 - datetime(2022, 1, 1, tzinfo=UTC)).total_seconds() // 3600)
    assert rows[index][0] == "2022-07-14 15:00"
    for zone in ZONES:
        expected = row_value(header, rows[index], zone)
        assert carbon.intensity(zone, when_2022) == expected
        assert carbon.intensity(zone, when_2022.replace(year=2025)) == expected


def test_the_last_hour_of_a_year_is_the_last_row(carbon, csv_data):
    header, rows = csv_data
    assert rows[-1][0] == "2022-12-31 23:00"
    last_minute = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert carbon.intensity("SE-SE3", last_minute) == row_value(header, rows[-1], "SE-SE3")


def test_29_february_reads_as_28_february(carbon):
    leap = datetime(2024, 2, 29, 9, 15, tzinfo=UTC)
    assert carbon.intensity("FR", leap) == carbon.intensity("FR", datetime(2022, 2, 28, 9, 15, tzinfo=UTC))


def test_an_unknown_zone_raises_key_error():
    with pytest.raises(KeyError, match="XX-NOWHERE"):
        HourlyCarbon.load(["FR", "XX-NOWHERE"])


def test_asking_a_zone_that_was_not_loaded_raises_key_error(carbon):
    with pytest.raises(KeyError):
        carbon.intensity("DE", datetime(2022, 1, 1, tzinfo=UTC))


def test_a_site_in_a_zone_the_data_lacks_is_refused_by_name(tmp_path):
    sites = tmp_path / "sites.yaml"
    entry = "{{id: {id}, kind: private_cloud, country: SE, jurisdiction: EU, {carbon}, gpus: {{H100: 8}}}}"
    sites.write_text("sites:\n" + "".join(f"  - {entry.format(id=i, carbon=c)}\n"
                                          for i, c in (("sto", "carbon_zone: SE"), ("own", "carbon_g_per_kwh: 40"))))
    catalog = Catalog.load(sites)
    with pytest.raises(CatalogError, match=r"site sto: carbon_zone 'SE' is not a zone of the carbon data .*SE-SE3"):
        check_zones(catalog, default_carbon().zones)
    check_zones(Catalog.load(), default_carbon().zones)  # the demo's zones are all there
