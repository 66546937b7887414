"""Grid carbon intensity by zone and hour, from the real 2022 European data (Electricity Maps).

The data covers 2022; a time in another year is mapped onto the same hour of 2022 (same month, day and
hour, 29 February read as 28), so a job in January sees a winter grid. A live feed can replace this
provider later: everything else asks a `CarbonProvider` for `intensity(zone, when)`, through
`site_intensity`, which also applies a catalog's fixed value.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Protocol

from shared.contracts.catalog import Catalog, CatalogError, SiteEntry

_START = datetime(2022, 1, 1, tzinfo=UTC)


class CarbonProvider(Protocol):
    def intensity(self, zone: str, when: datetime) -> float:
        """gCO2eq/kWh in `zone` during the hour that contains `when`."""
        ...


def site_intensity(site: SiteEntry, when: datetime, provider: CarbonProvider) -> float:
    """The site's grid intensity at `when`: the catalog's fixed value if it has one, else its zone's."""
    if site.carbon_g_per_kwh is not None:
        return site.carbon_g_per_kwh
    assert site.carbon_zone is not None  # a catalog site has one or the other (SiteEntry checks it)
    return provider.intensity(site.carbon_zone, when)


def check_zones(catalog: Catalog, zones: Iterable[str]) -> None:
    """Every site's carbon zone is one the data has (else CatalogError, naming the site and the known zones)."""
    known = set(zones)
    for site in catalog.sites.values():
        if site.carbon_g_per_kwh is None and site.carbon_zone not in known:
            raise CatalogError(f"site {site.id}: carbon_zone {site.carbon_zone!r} is not a zone of the carbon data "
                               f"(known: {', '.join(sorted(known))}); or give carbon_g_per_kwh")


class HourlyCarbon:
    """The shipped 2022 hourly data as a CarbonProvider."""

    def __init__(self, zones: dict[str, list[float]]) -> None:
        self._zones = zones

    @classmethod
    def load(cls, zones: Iterable[str] | None = None) -> HourlyCarbon:
        wanted = set(zones) if zones is not None else None
        with resources.files("shared.data").joinpath("carbon_intensity_2022_eu_hourly.csv").open() as f:
            reader = csv.reader(f)
            header = next(reader)
            columns = {name: i for i, name in enumerate(header[1:], start=1) if wanted is None or name in wanted}
            series: dict[str, list[float]] = {name: [] for name in columns}
            for row in reader:
                for name, i in columns.items():
                    series[name].append(float(row[i]))
        missing = (wanted or set()) - set(series)
        if missing:
            raise KeyError(f"no carbon data for zone(s) {sorted(missing)}; known: {header[1:]}")
        return cls(series)

    @property
    def zones(self) -> list[str]:
        return sorted(self._zones)

    def intensity(self, zone: str, when: datetime) -> float:
        """gCO2eq/kWh in `zone` during the hour that contains `when`."""
        series = self._zones[zone]
        when = when.astimezone(UTC)
        day = 28 if (when.month, when.day) == (2, 29) else when.day
        hour_start = when.replace(year=2022, day=day, minute=0, second=0, microsecond=0)
        hour = int((hour_start - _START).total_seconds() // 3600)
        return series[hour % len(series)]


@lru_cache(maxsize=1)
def default_carbon() -> HourlyCarbon:
    return HourlyCarbon.load()
