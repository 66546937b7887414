"""The catalog files (CONTRACT.md): the sites and the tenants, validated once at start.

A bad file stops `continuum up` with a message that names the file, the entry and the problem.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from .jobs import GPU_TYPES, TENANT_PATTERN, AbsolutePath, JobSpec, beneath

SiteId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=63)]
Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]


def _known_gpu_type(name: str) -> str:
    if name not in GPU_TYPES:
        raise ValueError(f"unknown GPU type {name!r}: one of {', '.join(GPU_TYPES)}")
    return name


# a GPU type the catalog may name, kept a str: the code meets it with a job's `any` and a trace's types
GpuType = Annotated[str, AfterValidator(_known_gpu_type)]


class SlurmOptions(BaseModel):
    """How a Slurm site takes jobs: where they go, the site's own defaults (applied only to what a job leaves
    unset) and the limits it is known to have (a job beyond them is ineligible there before any dispatch)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # defaults: sent as --mem-per-gpu / --cpus-per-gpu when the job names no memory / CPUs (unset: Slurm's own)
    mem_per_gpu_gb: float | None = Field(None, gt=0)
    cpus_per_gpu: int | None = Field(None, ge=1)
    # the GRES type Slurm knows a catalog GPU type by (`h100` by default; "" for untyped `gpu:N` GRES)
    gres_type_map: dict[GpuType, Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]*$")]] = Field(
        default_factory=dict)
    # limits (MaxMemPerNode, a node's CPUs, MaxNodes, MaxTime of the partition)
    max_mem_per_node_gb: float | None = Field(None, gt=0)
    max_cpus_per_node: int | None = Field(None, ge=1)
    max_nodes: int | None = Field(None, ge=1)
    max_walltime_s: int | None = Field(None, ge=1)

    def gres_type(self, gpu_type: str) -> str:
        return self.gres_type_map.get(gpu_type, gpu_type.lower())


class SiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: SiteId
    kind: Literal["public_hpc", "private_cloud", "partner"]
    operator: str = ""
    country: Country
    jurisdiction: str  # required: a site must say under which law its data lives
    carbon_zone: str | None = None
    carbon_g_per_kwh: float | None = Field(None, ge=0)
    pue: float = Field(1.2, ge=1.0, le=3.0)
    certifications: list[str] = Field(default_factory=list)
    backend: Literal["simulated", "local", "slurm"] = "simulated"
    gpus: dict[GpuType, Annotated[int, Field(ge=0)]]
    gpu_watts: dict[GpuType, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    price_eur_per_gpu_hour: dict[GpuType, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    allocation_factor: dict[GpuType, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    overflow_share: float = Field(1.0, ge=0.0, le=1.0)
    slurm: SlurmOptions | None = None
    # the directory beneath which the site's agent stages a job's files (its inputs, outputs, file:// URLs, its
    # steps' workdir and redirections): local and Slurm sites run jobs as the agent's own user, without a
    # container, so a path anywhere else could overwrite or read the agent's own files. None: it stages none
    files_root: AbsolutePath | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SiteEntry:
        if self.carbon_zone is None and self.carbon_g_per_kwh is None:
            raise ValueError("needs carbon_zone or carbon_g_per_kwh")
        if self.slurm is not None and self.backend != "slurm":
            raise ValueError(f"slurm options on a site whose backend is {self.backend}")
        if self.files_root is not None and self.backend not in ("local", "slurm"):
            raise ValueError(f"files_root on a site whose backend is {self.backend}: only local and slurm sites "
                             f"stage files")
        for field in ("gpu_watts", "price_eur_per_gpu_hour", "allocation_factor"):
            unknown = set(getattr(self, field)) - set(self.gpus)
            if unknown:
                raise ValueError(f"{field} names GPU types the site does not offer: {sorted(unknown)}")
        unknown = set(self.slurm.gres_type_map if self.slurm else ()) - set(self.gpus)
        if unknown:
            raise ValueError(f"slurm.gres_type_map names GPU types the site does not offer: {sorted(unknown)}")
        return self

    @property
    def public(self) -> bool:
        return self.kind == "public_hpc"

    def cannot_stage(self, spec: JobSpec) -> str | None:
        """Why the site cannot stage the job's files, naming the field (None: it can, or the job has none): it
        stages none, or a path or file:// URL lies outside its `files_root`. As strings: the agent checks the
        real paths again when it stages them."""
        staged = spec.staged_paths()
        if not staged:
            return None
        if self.files_root is None:
            item, field, _ = staged[0]
            return f"stages no files ({item if field in ('path', 'url') else f'{item}.{field}'})"
        outside = [f"{item}.{field}" for item, field, path in staged if not beneath(path, self.files_root)]
        if not outside:
            return None
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        return f"{outside[0]} is outside {self.files_root}{more}"

    def price(self, gpu_type: str) -> float:
        return self.price_eur_per_gpu_hour.get(gpu_type, 0.0)

    def watts(self, gpu_type: str) -> float:
        return self.gpu_watts.get(gpu_type, DEFAULT_GPU_WATTS[gpu_type])


# Board power (TDP) of each GPU type, used where a site does not give its own figure.
DEFAULT_GPU_WATTS = {"H100": 700.0, "A100": 400.0, "L40S": 350.0, "L4": 72.0}
assert set(DEFAULT_GPU_WATTS) == set(GPU_TYPES)


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(pattern=TENANT_PATTERN)]
    allocation_gpu_hours: float = Field(0.0, ge=0)
    overflow: Literal["allowed", "forbidden"] = "allowed"
    monthly_budget_eur: float = Field(0.0, ge=0)
    residency: Annotated[str, StringConstraints(pattern=r"^(EU|any|[A-Z]{2})$")] = "EU"
    overflow_after_wait_s: float = Field(1800.0, ge=0)


class SitesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sites: list[SiteEntry] = Field(min_length=1)


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: list[TenantEntry] = Field(min_length=1)


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file, the entry and the problem."""


class Catalog(BaseModel):
    sites: dict[str, SiteEntry]
    tenants: dict[str, TenantEntry]

    @classmethod
    def load(cls, sites_file: Path | None = None, tenants_file: Path | None = None) -> Catalog:
        """Read the catalog files; without them, the built-in demo catalog."""
        sites = _read(sites_file, "demo_sites.yaml", SitesFile, "sites")
        tenants = _read(tenants_file, "demo_tenants.yaml", TenantsFile, "tenants")
        return cls(sites=_unique(sites.sites, sites_file, "sites"),
                   tenants=_unique(tenants.tenants, tenants_file, "tenants"))

    def site(self, site_id: str) -> SiteEntry:
        return self.sites[site_id]


def _read(path: Path | None, builtin: str, model: type[SitesFile] | type[TenantsFile], key: str):
    name = str(path) if path else f"built-in {builtin}"
    try:
        text = Path(path).read_text() if path else resources.files("shared.catalog").joinpath(builtin).read_text()
    except OSError as e:
        raise CatalogError(f"{name}: cannot read: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogError(f"{name}: not valid YAML: {e}") from e
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise CatalogError(_describe(name, key, raw, e)) from e


def _describe(name: str, key: str, raw: object, error: ValidationError) -> str:
    problems = []
    for err in error.errors():
        loc = list(err["loc"])
        where = "file"
        if len(loc) >= 2 and loc[0] == key and isinstance(loc[1], int):
            index = loc[1]
            entry_id = None
            if isinstance(raw, dict) and isinstance(raw.get(key), list) and index < len(raw[key]):
                item = raw[key][index]
                entry_id = item.get("id") if isinstance(item, dict) else None
            where = f"entry {index + 1}" + (f" ({entry_id})" if entry_id else "")
            loc = loc[2:]
        field = ".".join(str(p) for p in loc)
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{name}: {where}: {field + ': ' if field else ''}{msg}")
    return "\n".join(problems)


def _unique(entries: list, path: Path | None, key: str) -> dict:
    out: dict = {}
    for index, entry in enumerate(entries):
        if entry.id in out:
            raise CatalogError(f"{path or 'built-in catalog'}: entry {index + 1} ({entry.id}): duplicate id in {key}")
        out[entry.id] = entry
    return out
