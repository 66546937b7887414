"""What a replay found, written down (CONTRACT.md, "v2: Replay"): `summary.json` (the same inputs give the same
bytes), one `jobs-<policy>.csv` a policy, and `report.md` with its plots, for a funder to read."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from services.replay.engine import Outcome

CSV_COLUMNS = ("job_id", "tenant", "submit", "start", "end", "site", "gpu_type", "gpus", "wait_s", "cost_eur",
               "energy_kwh", "co2e_kg")


def _runs(outcomes: Iterable[Outcome]) -> list[tuple[Outcome, str, float, float]]:
    """Each job that ran, with its site, start and end (the engine sets the three when the job starts)."""
    runs = []
    for o in outcomes:
        if o.site is not None:
            assert o.start_s is not None and o.end_s is not None
            runs.append((o, o.site, o.start_s, o.end_s))
    return runs


def summarise(outcomes: Sequence[Outcome]) -> dict:
    """A policy's figures over the jobs that ran (`rejected`: those no site could run under it)."""
    runs = _runs(outcomes)
    ran = [o for o, _, _, _ in runs]
    waits = sorted(start - o.submit_s for o, _, start, _ in runs)
    by_site: dict[str, dict] = {}
    for o, site_id, start, end in runs:
        site = by_site.setdefault(site_id, {"jobs": 0, "gpu_hours": 0.0})
        site["jobs"] += 1
        site["gpu_hours"] += o.gpus * (end - start) / 3600
    return {
        "jobs": len(ran),
        "rejected": len(outcomes) - len(ran),
        "mean_wait_s": _r(sum(waits) / len(waits)) if waits else 0.0,
        "p95_wait_s": _r(_percentile(waits, 0.95)),
        "mean_jct_s": _r(sum(end - o.submit_s for o, _, _, end in runs) / len(ran)) if ran else 0.0,
        "cost_eur": _r(sum(o.cost_eur for o in ran)),
        "allocation_hours": _r(sum(o.allocation_hours for o in ran)),
        "energy_kwh": _r(sum(o.energy_kwh for o in ran)),
        "co2e_kg": _r(sum(o.co2e_kg for o in ran)),
        "overflow_jobs": sum(o.overflow for o in ran),
        "residency_violations": sum(not o.residency_ok for o in ran),
        "by_site": {s: {"jobs": v["jobs"], "gpu_hours": _r(v["gpu_hours"])} for s, v in sorted(by_site.items())},
    }


def write(out: Path, trace: str, jobs: int, results: dict[str, list[Outcome]], start: datetime,
          notes: dict[str, str]) -> dict:
    """Every output file; the summary, as written."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"trace": trace, "jobs": jobs, "start": f"{start:%Y-%m-%d}",
               "policies": {name: summarise(outcomes) for name, outcomes in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for name, outcomes in results.items():
        with open(out / f"jobs-{name}.csv", "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(CSV_COLUMNS)
            for o in outcomes:
                rows.writerow([o.job_id, o.tenant, _time(start, o.submit_s), _time(start, o.start_s),
                               _time(start, o.end_s), o.site or "", o.gpu_type or "", o.gpus,
                               "" if o.wait_s is None else _r(o.wait_s), _r(o.cost_eur), _r(o.energy_kwh),
                               _r(o.co2e_kg)])
    plots = _plots(out, results)
    (out / "report.md").write_text(_report(summary, plots, notes))
    return summary


def _report(summary: dict, plots: list[str], notes: dict[str, str]) -> str:
    policies = summary["policies"]
    lines = [f"# Replay of {summary['trace']}", "",
             (f"{summary['jobs']} jobs, from {summary['start']} (trace time 0), through the production placement "
              "policy, each ended job rated as billing rates it, with the hourly 2022 carbon intensity of each "
              "site's zone (Electricity Maps)."), "",
             ("| policy | jobs run | not run | mean wait | p95 wait | mean JCT | cost EUR | allocation h | "
              "energy kWh | CO2e kg | overflow jobs | residency violations |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in policies.items():
        lines.append(f"| {name} | {p['jobs']} | {p['rejected']} | {_d(p['mean_wait_s'])} | {_d(p['p95_wait_s'])} | "
                     f"{_d(p['mean_jct_s'])} | {p['cost_eur']:,.2f} | {p['allocation_hours']:,.1f} | "
                     f"{p['energy_kwh']:,.1f} | {p['co2e_kg']:,.1f} | {p['overflow_jobs']} | "
                     f"{p['residency_violations']} |")
    lines += ["", "Where each policy ran the jobs (GPU-hours):", "",
              "| policy | " + " | ".join(sorted({s for p in policies.values() for s in p["by_site"]})) + " |"]
    sites = sorted({s for p in policies.values() for s in p["by_site"]})
    lines.append("|---|" + "---:|" * len(sites))
    for name, p in policies.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['by_site'].get(s, {}).get('gpu_hours', 0):,.0f}"
                                                for s in sites) + " |")
    if "public-only" in policies and "continuum" in policies and policies["public-only"]["mean_wait_s"]:
        base, cont = policies["public-only"], policies["continuum"]
        cut = 1 - cont["mean_wait_s"] / base["mean_wait_s"]
        lines += ["", (f"Overflow (`continuum` against `public-only`): mean wait "
                       f"{_change(cont['mean_wait_s'], base['mean_wait_s'])}, at {cont['cost_eur']:,.2f} EUR. "
                       f"{_target('a cut of 50 % or more', cut >= 0.5, f'{(0.5 - cut) * 100:.0f} points short')}")]
    if "cheapest" in policies and "carbon" in policies and policies["cheapest"]["co2e_kg"]:
        cheap, green = policies["cheapest"], policies["carbon"]
        saved = 1 - green["co2e_kg"] / cheap["co2e_kg"]
        dearer = green["cost_eur"] / cheap["cost_eur"] - 1 if cheap["cost_eur"] else 0.0
        short = [f"CO2e {(0.4 - saved) * 100:.0f} points short"] if saved < 0.4 else []
        short += [f"cost {(dearer - 0.1) * 100:.0f} points over"] if dearer > 0.1 else []
        lines += ["", (f"Carbon-aware placement (`carbon` against `cheapest`): CO2e "
                       f"{_change(green['co2e_kg'], cheap['co2e_kg'])}, "
                       f"cost {_change(green['cost_eur'], cheap['cost_eur'])}. "
                       f"{_target('40 % less CO2e for at most 10 % more cost', not short, ', '.join(short))}")]
    lines += ["", *(f"![{plot}]({plot})" for plot in plots)]
    lines += ["", *(f"- {k}: {v}" for k, v in notes.items()), ""]
    return "\n".join(lines)


def _plots(out: Path, results: dict[str, list[Outcome]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, outcomes in results.items():
        waits = sorted(o.wait_s / 3600 for o in outcomes if o.wait_s is not None)
        if waits:
            ax.step(waits, [(i + 1) / len(waits) for i in range(len(waits))], where="post", label=name)
    ax.set(xlabel="wait (hours)", ylabel="share of jobs", title="Waits, by policy (CDF)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.legend()
    made.append(_save(fig, out, "waits_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, outcomes in results.items():
        ran = [o for o in outcomes if o.site]
        ax.scatter(sum(o.cost_eur for o in ran), sum(o.co2e_kg for o in ran), s=60)
        ax.annotate(name, (sum(o.cost_eur for o in ran), sum(o.co2e_kg for o in ran)), textcoords="offset points",
                    xytext=(6, 4))
    ax.set(xlabel="cost (EUR)", ylabel="CO2e (kg)", title="CO2e against cost, by policy")
    made.append(_save(fig, out, "co2e_vs_cost.png"))

    for name, outcomes in results.items():
        fig, ax = plt.subplots(figsize=(8, 4))
        runs = _runs(outcomes)
        for site in sorted({site_id for _, site_id, _, _ in runs}):
            changes: dict[float, int] = {}
            for o, site_id, start, end in runs:
                if site_id == site:
                    changes[start] = changes.get(start, 0) + o.gpus
                    changes[end] = changes.get(end, 0) - o.gpus
            times, busy, level = [], [], 0
            for at in sorted(changes):
                level += changes[at]
                times.append(at / 86400)
                busy.append(level)
            ax.step(times, busy, where="post", label=site)
        ax.set(xlabel="days from the start", ylabel="GPUs busy", title=f"GPUs busy per site: {name}")
        ax.legend(fontsize="small")
        made.append(_save(fig, out, f"busy_{name}.png"))
    return made


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    # no date in the file: the same replay, the same bytes
    fig.savefig(out / name, dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _r(x: float) -> float:
    return round(x, 3)


def _time(start: datetime, seconds: float | None) -> str:
    return "" if seconds is None else (start + timedelta(seconds=seconds)).isoformat()


def _d(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _target(aim: str, met: bool, miss: str) -> str:
    """The research issue's aim, and whether this replay met it (docs/research.md says why, when not)."""
    return f"Aim: {aim}: {'met' if met else 'not met, ' + miss}."


def _change(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.0f} %" if old else "n/a"
