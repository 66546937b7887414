"""Job traces, read into one shape: who submitted what, when, for how long, on how many GPUs. Pure.

Three formats (docs/research.md says what each field becomes):
- **Philly** (Microsoft's GPU cluster, 2017; the project ships it: shared/data/philly_gpu_jobs.csv):
  `timestamp,duration,num_gpus,gpu_time,cluster`; the user is the virtual cluster.
- **Alibaba GPU cluster trace v2023** (`openb_pod_list_*.csv`): `name,cpu_milli,memory_mib,num_gpu,gpu_milli,
  gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time`, seconds from the trace's start. GPU pods
  only; a pod never scheduled is left out; one still running at the trace's end (no deletion time, or phase
  `Running`) ran at least until the trace's last timestamp, and is kept with that cut runtime (a lower
  bound). A pod's fraction of a GPU (`gpu_milli` < 1000) takes a whole one: sites rent whole GPUs. The
  user is the pod's QoS class (the trace has no user).
- **SWF** (the Parallel Workloads Archive's Standard Workload Format, HPC traces): 18 fields a line, `;`
  comments; submit time, run time, allocated (else requested) processors and user id. A job that never ran
  (run time <= 0) is left out; its processors become GPUs at `cpus_per_gpu` a GPU.

Trace users map to catalog tenants deterministically (`tenant_of`): an override file first, else a hash of the
user's name picks a tenant, the same one on every run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

FORMATS = ("philly", "alibaba", "swf")
SWF_CPUS_PER_GPU = 8  # an HPC processor count as GPUs: a GPU node's CPUs per GPU (Jean Zay's A100 nodes: 8)


@dataclass(frozen=True)
class TraceJob:
    job_id: str
    user: str
    submit_s: float  # seconds from the trace's start
    runtime_s: float
    gpus: int


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file, the line and the problem."""


def detect(path: Path, head: str) -> str:
    """The format of a trace from its first lines (`auto`)."""
    first = next((line for line in head.splitlines() if line.strip()), "")
    if first.startswith(";") or path.suffix.lower() == ".swf":
        return "swf"
    columns = {c.strip() for c in first.split(",")}
    if {"timestamp", "duration", "num_gpus"} <= columns:
        return "philly"
    if {"num_gpu", "creation_time", "scheduled_time"} <= columns:
        return "alibaba"
    raise TraceError(f"{path}: not a trace this reads (philly, alibaba, swf); its first line is {first[:80]!r}")


def read(path: Path, fmt: str = "auto") -> list[TraceJob]:
    """The trace's jobs in submit order (ties by id)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from e
    fmt = detect(path, text[:4096]) if fmt == "auto" else fmt
    reader = {"philly": philly, "alibaba": alibaba, "swf": swf}[fmt]
    try:
        jobs = reader(io.StringIO(text), str(path))
    except TraceError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise TraceError(f"{path}: not a {fmt} trace: {e}") from None
    return sorted(jobs, key=lambda j: (j.submit_s, j.job_id))


def philly(lines: Iterable[str], name: str = "trace") -> list[TraceJob]:
    rows = list(_rows(lines, name, ("timestamp", "duration", "num_gpus", "cluster")))
    if not rows:
        return []
    times = [datetime.fromisoformat(row["timestamp"]) for _, row in rows]
    start = min(times)
    return [TraceJob(job_id=f"philly-{n}", user=row["cluster"], submit_s=(at - start).total_seconds(),
                     runtime_s=max(1.0, float(row["duration"])), gpus=int(float(row["num_gpus"])))
            for (n, row), at in zip(rows, times, strict=True) if int(float(row["num_gpus"])) > 0]


def alibaba(lines: Iterable[str], name: str = "trace") -> list[TraceJob]:
    rows = list(_rows(lines, name, ("name", "num_gpu", "gpu_milli", "qos", "pod_phase", "creation_time",
                                    "deletion_time", "scheduled_time")))
    ends = [float(row[k]) for _, row in rows for k in ("creation_time", "deletion_time", "scheduled_time")
            if row[k].strip()]
    trace_end = max(ends, default=0.0)
    jobs = []
    for _, row in rows:
        gpus = int(row["num_gpu"] or 0)
        scheduled = float(row["scheduled_time"]) if row["scheduled_time"].strip() else 0.0
        if gpus <= 0 or scheduled <= 0:
            continue  # not a GPU pod, or never scheduled
        deleted = float(row["deletion_time"]) if row["deletion_time"].strip() else 0.0
        running = row["pod_phase"] == "Running" or deleted <= 0
        end = trace_end if running else deleted
        jobs.append(TraceJob(job_id=row["name"], user=row["qos"] or "default", submit_s=float(row["creation_time"]),
                             runtime_s=max(1.0, end - scheduled), gpus=max(1, gpus)))
    return jobs


def swf(lines: Iterable[str], name: str = "trace", cpus_per_gpu: int = SWF_CPUS_PER_GPU) -> list[TraceJob]:
    jobs = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        fields = line.split()
        if len(fields) < 18:
            raise TraceError(f"{name}: line {number}: an SWF line has 18 fields, this one {len(fields)}")
        try:
            job, submit, run = fields[0], float(fields[1]), float(fields[3])
            procs = int(fields[4]) if int(fields[4]) > 0 else int(fields[7])
        except ValueError as e:
            raise TraceError(f"{name}: line {number}: {e}") from None
        if run <= 0 or procs <= 0:
            continue  # never ran
        jobs.append(TraceJob(job_id=f"swf-{job}", user=f"user-{fields[11]}", submit_s=submit, runtime_s=run,
                             gpus=max(1, math.ceil(procs / cpus_per_gpu))))
    return jobs


def _rows(lines: Iterable[str], name: str, needed: tuple[str, ...]):
    reader = csv.DictReader(lines)
    missing = set(needed) - set(reader.fieldnames or ())
    if missing:
        raise TraceError(f"{name}: no column {', '.join(sorted(missing))} (it has {reader.fieldnames})")
    yield from enumerate(reader, start=2)


def tenant_of(user: str, tenants: list[str], overrides: dict[str, str] | None = None, seed: int = 0) -> str:
    """The catalog tenant a trace user submits as: the override file's, else one picked by a hash of the seed
    and the user's name among the tenants sorted by id (the same on every run with that seed, whatever the
    order of the catalog; another seed deals the users out again)."""
    if overrides and user in overrides:
        return overrides[user]
    ordered = sorted(tenants)
    return ordered[int(hashlib.sha256(f"{seed}:{user}".encode()).hexdigest()[:8], 16) % len(ordered)]
