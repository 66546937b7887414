"""`continuum replay` as a researcher runs it, on the shipped Philly trace over the demo catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
PHILLY = ROOT / "shared" / "data" / "philly_gpu_jobs.csv"


def replay(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "replay", str(PHILLY), "--jobs", "60", "--out",
                           str(out), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, COLUMNS="200"), check=False)


def test_a_replay_writes_its_findings_the_same_twice_without_residency_violations(tmp_path):
    first, second = replay(tmp_path / "a"), replay(tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    summary = (tmp_path / "a" / "summary.json").read_bytes()
    assert summary == (tmp_path / "b" / "summary.json").read_bytes()  # deterministic, to the byte
    found = json.loads(summary)
    assert found["jobs"] == 60 and set(found["policies"]) == {"public-only", "cheapest", "continuum", "carbon",
                                                               "carbon-shift"}
    for name, policy in found["policies"].items():
        assert policy["residency_violations"] == 0, name
        assert policy["jobs"] + policy["rejected"] == 60
        rows = (tmp_path / "a" / f"jobs-{name}.csv").read_text().splitlines()
        assert rows[0] == "job_id,tenant,submit,start,end,site,gpu_type,gpus,wait_s,cost_eur,energy_kwh,co2e_kg"
        assert len(rows) == 61
    # public-only never pays; the others overflow to paid sites
    assert found["policies"]["public-only"]["cost_eur"] == 0 and found["policies"]["cheapest"]["cost_eur"] > 0
    report = (tmp_path / "a" / "report.md").read_text()
    for plot in ("waits_cdf.png", "co2e_vs_cost.png", "busy_continuum.png"):
        assert f"]({plot})" in report and (tmp_path / "a" / plot).stat().st_size > 1000


def test_a_bad_policy_or_trace_is_refused_with_the_reason(tmp_path):
    wrong = replay(tmp_path, "--policy", "greedy")
    assert wrong.returncode == 2 and "--policy greedy: one of public-only" in wrong.stderr
    foreign = tmp_path / "x.csv"
    foreign.write_text("a,b\n1,2\n")
    result = subprocess.run([sys.executable, "-m", "services.cli", "replay", str(foreign), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ, COLUMNS="200"),
                            check=False)
    assert result.returncode == 2 and "not a trace this reads" in result.stderr
