"""`continuum demo`: the whole system on this machine, a realistic mixed batch, live progress, a summary.

The batch mixes the demo's three tenants: a CNRS lab training on H100 and A100 (more than Jean Zay holds,
so some of it overflows to paid sites), a start-up fine-tuning and serving on paid GPUs, and a media group
whose jobs must stay in France (some needing SecNumCloud). One job fails, one asks for more than any
French site has and is rejected with reasons, one is malformed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from services.runtime import System, reach_running
from shared.bus import connect, request_json
from shared.contracts.catalog import Catalog
from shared.contracts.jobs import TERMINAL_STATES
from shared.contracts.subjects import Subjects
from shared.settings import Settings

TERMINAL = {s.value for s in TERMINAL_STATES}


def demo_batch(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    batch: list[dict] = []
    for i in range(n):
        pick = i % 6
        runtime = round(rng.uniform(2.0, 8.0), 1)
        if pick in (0, 1):
            spec = {"tenant": "cnrs-lab", "name": f"climate-llm-pretrain-{i}", "command": ["python", "train.py"],
                    "resources": {"gpus": rng.choice([4, 8]), "gpu_type": "H100"}, "walltime_s": 7200}
        elif pick == 2:
            spec = {"tenant": "cnrs-lab", "name": f"protein-fold-{i}", "command": ["python", "fold.py"],
                    "resources": {"gpus": rng.choice([2, 4]), "gpu_type": "A100"}, "walltime_s": 3600}
        elif pick == 3:
            spec = {"tenant": "lumen-ai", "name": f"finetune-{i}", "command": ["torchrun", "ft.py"],
                    "resources": {"gpus": rng.choice([1, 2]), "gpu_type": rng.choice(["H100", "L40S"])},
                    "walltime_s": 3600, "objective": "cost"}
        elif pick == 4:
            spec = {"tenant": "lumen-ai", "name": f"batch-inference-{i}", "command": ["python", "serve.py"],
                    "resources": {"gpus": 1, "gpu_type": "L4"}, "walltime_s": 1800}
        else:
            spec = {"tenant": "media-fr", "name": f"video-dubbing-{i}", "command": ["python", "dub.py"],
                    "resources": {"gpus": rng.choice([1, 2]), "gpu_type": "H100"}, "walltime_s": 3600,
                    "residency": "FR"}
            if i % 12 == 5:
                spec["certifications"] = ["secnumcloud"]
        spec["labels"] = {"sim.runtime_s": str(runtime)}
        batch.append(spec)
    batch.append({"tenant": "cnrs-lab", "name": "diverging-run", "command": ["python", "train.py"],
                  "resources": {"gpus": 2, "gpu_type": "A100"}, "walltime_s": 600,
                  "labels": {"sim.runtime_s": "3", "sim.exit_code": "1"}})
    batch.append({"tenant": "media-fr", "name": "too-big-for-france", "command": ["python", "x.py"],
                  "resources": {"gpus": 64, "gpu_type": "H100"}, "residency": "FR", "walltime_s": 600})
    batch.append({"tenant": "lumen-ai", "name": "typo", "command": ["python"], "resources": {"gpus": -1}})
    return batch


def run_demo(settings: Settings, console: Console, *, jobs: int = 36, keep: bool = False) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="continuum-demo-"))
    settings = settings.model_copy(update={"data_dir": data_dir, "ledger_path": None})
    system = System(settings)
    try:
        with console.status("starting nats-server and the services..."):
            url = system.start(Catalog.load(settings.sites_file, settings.tenants_file))
        console.print(f"[green]system up[/] on {url} (data and logs in {data_dir})")
        # as the operator: the demo submits for three tenants and watches every event
        return asyncio.run(_drive(reach_running(settings), Subjects(settings.prefix), console, demo_batch(jobs),
                                  system, keep))
    finally:
        with console.status("stopping..."):
            system.stop()


@dataclass
class _Batch:
    """The demo's jobs as the event stream tells of them."""

    states: dict[str, str] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    overflow: set[str] = field(default_factory=set)
    billed: dict[str, dict] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    rejected_at_submit: list[tuple[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_event(self, msg) -> None:
        event = orjson.loads(msg.data)
        data = event["data"]
        kind = event["type"].rsplit(".", 1)[-1]
        if event["type"] == "continuum.billing.usage":
            self.billed[data["job_id"]] = data
        elif "job_id" in data and self.states.get(data["job_id"]) not in TERMINAL:
            self.states[data["job_id"]] = kind
            if data.get("site"):
                self.sites[data["job_id"]] = data["site"]
            if kind == "placed" and data.get("overflow"):
                self.overflow.add(data["job_id"])
        self.changed.set()

    async def submit(self, nc, subjects: Subjects, specs: list[dict]) -> None:
        for spec in specs:
            reply = await request_json(nc, subjects.jobs_submit, spec)
            self.names[reply["job_id"]] = spec.get("name", "")
            if reply["state"] == "rejected":
                self.rejected_at_submit.append((spec.get("name", ""), "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in reply["errors"])))
                self.states[reply["job_id"]] = "rejected"
            else:
                self.states.setdefault(reply["job_id"], "accepted")

    async def follow(self, console: Console, timeout_s: float = 180.0) -> bool:
        """Show progress until every job ended and every run is billed; False if that takes too long."""
        ours, start = set(self.names), time.monotonic()
        with Live(console=console, refresh_per_second=4) as live:
            while True:
                counts = Counter(self.states[j] for j in ours)
                done = sum(counts[s] for s in TERMINAL)
                live.update(_progress(counts, done, len(ours), self.sites, ours, time.monotonic() - start))
                finished = [j for j in ours if self.states[j] in ("succeeded", "failed", "cancelled")]
                if done == len(ours) and all(j in self.billed for j in finished if j in self.sites):
                    return True
                if time.monotonic() - start > timeout_s:
                    return False
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.5)

    def report(self, console: Console, system: System) -> None:
        ours = set(self.names)
        console.print(_summary(ours, self.states, self.sites, self.overflow, self.billed))
        for name, why in self.rejected_at_submit:
            console.print(f"  rejected at submission: {name}: {why}")
        rejected = [j for j in ours if self.states[j] == "rejected"]
        impossible = [j for j in rejected if j in self.sites] or \
                     [j for j in rejected if self.names[j] == "too-big-for-france"]
        for j in impossible:
            console.print(f"  rejected by routing: {self.names[j]} (see `continuum status {j}`)")
        console.print("\nNext: `continuum status JOB_ID` shows why a job went where it did; `continuum sites` "
                      "each site's load, forecast wait and carbon now; `continuum watch` streams events (`--sites`: "
                      "up, down, saturated); `continuum bill cnrs-lab` prints a statement; `continuum overflow` "
                      "counts overflow. `continuum up` also serves the dashboard, TES and the REST API over HTTP "
                      "(the URL it prints; README, \"Over HTTP\").")
        traced = sorted(j for j in ours if self.states[j] == "succeeded")
        if traced:
            console.print(f"Traces: every job is one OpenTelemetry trace, from submission to billing. "
                          f"`CONTINUUM_DATA_DIR={system.settings.data_dir} continuum trace {traced[0]}` draws one "
                          "as a waterfall; the README's operator section shows them in Jaeger.")


async def _drive(client: Settings, subjects: Subjects, console: Console, batch: list[dict], system: System,
                 keep: bool) -> int:
    nc = await connect(client)
    try:
        with console.status("waiting for every site to report..."):
            await _until_sites_up(nc, subjects, system)
        jobs = _Batch()
        await nc.subscribe(subjects.events_all, cb=jobs.on_event)
        await jobs.submit(nc, subjects, batch)
        if not await jobs.follow(console):
            console.print("[red]the batch did not finish within 3 minutes[/]")
            return 1
        jobs.report(console, system)
        if keep:
            console.print(f"[bold]the system stays up[/] on {client.nats_url}: `CONTINUUM_DATA_DIR="
                          f"{system.settings.data_dir} continuum ...` talks to it; Ctrl-C stops it")
            while True:
                system.check()
                await asyncio.sleep(0.5)
        return 0
    finally:
        await nc.close()


async def _until_sites_up(nc, subjects: Subjects, system: System, timeout: float = 60.0) -> None:
    """Every service ready (intake among them: the batch goes there next) and every site reporting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        system.check()
        try:
            reply = await request_json(nc, subjects.sites_list, {}, timeout=2.0)
            if system.ready and reply.get("sites") and all(s["state"] == "up" for s in reply["sites"]):
                return
        except RuntimeError:
            pass  # capacity is still starting
        await asyncio.sleep(0.3)
    raise RuntimeError(f"sites did not come up within {timeout} s (see logs in {system.log_dir})")


def _progress(counts: Counter, done: int, total: int, sites: dict, ours: set, elapsed: float) -> Group:
    table = Table(title=f"{done}/{total} jobs finished, {elapsed:.0f} s")
    order = ("accepted", "queued", "placed", "dispatched", "started", "succeeded", "failed", "cancelled", "rejected")
    for state in order:
        table.add_column(state, justify="right")
    table.add_row(*(str(counts.get(s, 0)) for s in order))
    per_site = Counter(sites[j] for j in ours if j in sites)
    where = Table(title="jobs by site")
    for site in sorted(per_site):
        where.add_column(site, justify="right")
    where.add_row(*(str(per_site[s]) for s in sorted(per_site)))
    return Group(table, where)


def _summary(ours: set, states: dict, sites: dict, overflow: set, billed: dict) -> Table:
    table = Table(title="summary: where the batch ran")
    for col in ("site", "jobs", "overflowed", "failed", "GPU-hours", "cost EUR", "allocation h", "CO2e kg"):
        table.add_column(col, justify="right" if col != "site" else "left")
    by_site: dict[str, list[str]] = {}
    for j in ours:
        if j in sites and states[j] != "rejected":
            by_site.setdefault(sites[j], []).append(j)
    totals: Counter[str] = Counter()
    for site in sorted(by_site):
        js = by_site[site]
        row: Counter[str] = Counter()
        for j in js:
            line = billed.get(j, {})
            for key in ("gpu_hours", "amount_eur", "allocation_hours", "co2e_kg"):
                row[key] += line.get(key, 0.0)
        row["jobs"] = len(js)
        row["overflowed"] = sum(j in overflow for j in js)
        row["failed"] = sum(states[j] == "failed" for j in js)
        totals.update(row)
        table.add_row(site, *_cells(row))
    table.add_row("total", *_cells(totals), style="bold")
    return table


def _cells(row: Counter) -> list[str]:
    return [str(row["jobs"]), str(row["overflowed"]), str(row["failed"]), f"{row['gpu_hours']:.4f}",
            f"{row['amount_eur']:.2f}", f"{row['allocation_hours']:.4f}", f"{row['co2e_kg']:.4f}"]
