"""The `continuum` command as a user types it, against a running system."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import connect_when_up, record_when, start_system

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
DEMO = ROOT / "shared" / "catalog"


def continuum(system, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=dict(system.env, COLUMNS="200"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path, str(DEMO / "demo_sites.yaml"), str(DEMO / "demo_tenants.yaml"))


async def test_submit_status_sites_cancel_and_bill(system):
    nc = await connect_when_up(system)
    sites = continuum(system, "sites")
    assert sites.returncode == 0 and "jean-zay" in sites.stdout and "Electricity Maps" in sites.stdout

    first = continuum(system, "submit", "examples/dubbing-fr.yaml")
    again = continuum(system, "submit", "examples/dubbing-fr.yaml")
    assert first.returncode == 0 and first.stdout.split()[0] == "accepted"
    assert again.stdout.split()[1] == first.stdout.split()[1]  # the same idempotency key, the same job
    job_id = first.stdout.split()[1]
    await record_when(nc, job_id, "succeeded")
    status = continuum(system, "status", job_id)
    assert "state=succeeded" in status.stdout and "site=lepton-fr" in status.stdout
    assert "lacks certification secnumcloud" in status.stdout  # why not the others

    # its trace, from the embedded span file: every hop, each under the one before it
    waterfall = await trace_when(system, job_id, ("intake.submit", "intake.validate", "routing.place",
                                                  "agent.dispatch", "site.run", "billing.rate"))
    rows = [line.split("│")[1].rstrip() for line in waterfall.splitlines() if line.startswith("│")]
    assert [row.strip() for row in rows] == ["intake.submit", "intake.validate", "routing.place", "agent.dispatch",
                                             "site.run", "billing.rate"]
    indents = [len(row) - len(row.lstrip()) for row in rows]
    assert indents[1] == indents[2] > indents[0] and indents[5] > indents[4] > indents[3] > indents[2]
    assert "site=lepton-fr" in waterfall and "outcome=succeeded" in waterfall

    long_job = continuum(system, "submit", "examples/pretrain-h100.yaml").stdout.split()[1]
    await record_when(nc, long_job, "started")
    assert continuum(system, "cancel", long_job).stdout.strip() == f"{long_job}: cancelling"
    await record_when(nc, long_job, "cancelled")

    bill = continuum(system, "bill", "media-fr", "--format", "csv")
    lines = bill.stdout.strip().splitlines()
    assert lines[0].startswith("job_id,site,gpu_type") and lines[1].startswith(f"{job_id},lepton-fr,H100,2,")
    unknown = continuum(system, "bill", "nobody")
    assert unknown.returncode == 1 and "unknown tenant" in unknown.stderr
    assert continuum(system, "status", "no-such-job").returncode == 1
    unknown_trace = continuum(system, "trace", "no-such-job")
    assert unknown_trace.returncode == 1 and "no spans of job no-such-job" in unknown_trace.stderr
    await nc.close()


async def trace_when(system, job_id: str, spans: tuple[str, ...], timeout: float = 15.0) -> str:
    """`continuum trace JOB_ID` once it shows every one of `spans` (each service writes its spans about a
    second after they end)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = continuum(system, "trace", job_id)
        if all(span in shown.stdout for span in spans) or time.monotonic() > deadline:
            assert shown.returncode == 0 and all(span in shown.stdout for span in spans), shown.stdout + shown.stderr
            return shown.stdout
        await asyncio.sleep(0.1)  # the file is another process's: nothing to wait on but a new look


async def test_a_rejected_submission_says_why(tmp_path, system):
    await (await connect_when_up(system)).close()
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenant: cnrs-lab\ncommand: [x]\nresources: {gpus: -2}\n")
    result = continuum(system, "submit", str(bad))
    assert result.returncode == 1
    assert "resources.gpus: Input should be greater than or equal to 0" in result.stderr


def test_up_refuses_a_bad_catalog_naming_file_entry_and_problem(tmp_path):
    sites = tmp_path / "sites.yaml"
    sites.write_text("sites:\n"
                     "  - id: ok\n    kind: public_hpc\n    country: FR\n    jurisdiction: EU\n    carbon_zone: FR\n"
                     "    gpus: {H100: 8}\n"
                     "  - id: bad\n    kind: cloud\n    country: FR\n    jurisdiction: EU\n    carbon_zone: FR\n"
                     "    gpus: {H100: 8}\n    colour: blue\n")
    result = subprocess.run([sys.executable, "-m", "services.cli", "up", "--sites", str(sites)],
                            env=dict(os.environ, CONTINUUM_DATA_DIR=str(tmp_path / "data"), COLUMNS="200"),
                            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 2
    assert f"{sites}: entry 2 (bad): kind:" in result.stderr
    assert f"{sites}: entry 2 (bad): colour: unknown key" in result.stderr
