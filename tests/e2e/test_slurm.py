"""A real public-HPC site: jobs routed to it run in the real Slurm cluster that deploy/slurm/test-cluster.sh
installs and starts (skipped, with the reason, only where that cannot run: not root, no apt-get)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from services.agent.backends.slurm import SlurmBackend
from shared.bus import request_json
from shared.contracts.catalog import Catalog
from tests.conftest import SUBJECTS, listen
from tests.e2e.harness import CATALOG, connect_when_up, record_when, start_system

pytestmark = pytest.mark.e2e


@pytest.fixture
def system(slurm_cluster, nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path, "slurm_sites.yaml", "slurm_tenants.yaml")
    subprocess.run(["scancel", "--partition", slurm_cluster], check=False)


@pytest.fixture
def files_system(slurm_cluster, nats_server, tmp_path):
    """The same, the Slurm site staging files beneath `tmp_path/files` (the node is this machine: its filesystem
    is the agent's)."""
    sites = yaml.safe_load((CATALOG / "slurm_sites.yaml").read_text())
    sites["sites"][0]["files_root"] = str(tmp_path / "files")
    (tmp_path / "files").mkdir()
    (tmp_path / "slurm_sites.yaml").write_text(yaml.safe_dump(sites))
    yield from start_system(nats_server, tmp_path, str(tmp_path / "slurm_sites.yaml"), "slurm_tenants.yaml")
    subprocess.run(["scancel", "--partition", slurm_cluster], check=False)


@pytest.fixture
async def client(system):
    nc = await connect_when_up(system)
    events = await listen(nc)
    yield nc, events
    await nc.close()


def spec(command: list[str], gpus: int = 1, walltime: int = 600, **extra) -> dict:
    return {"tenant": "lab", "command": command, "resources": {"gpus": gpus, "gpu_type": "H100"},
            "walltime_s": walltime, "overflow": "forbidden", **extra}


async def submit(nc, body: dict) -> str:
    reply = await request_json(nc, SUBJECTS.jobs_submit, body)
    assert reply["state"] == "accepted", reply
    return reply["job_id"]


def data(events, job_id: str, kind: str) -> dict:
    return next(e for e in events.by_job[job_id] if e["type"].endswith("." + kind))["data"]


def slurm_job(job_id: str) -> dict[str, str]:
    """The job as Slurm itself shows it (scontrol), found by the name Continuum gave it."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = dict(token.split("=", 1) for token in line.split() if "=" in token)
        if fields.get("JobName") == f"continuum-{job_id}":
            return fields
    raise AssertionError(f"no Slurm job for {job_id}")


async def test_jobs_run_in_slurm_and_their_states_come_back(client):
    nc, events = client
    ok = await submit(nc, spec(["sh", "-c", 'test -n "$CUDA_VISIBLE_DEVICES"'], gpus=2))
    bad = await submit(nc, spec(["sh", "-c", "exit 3"]))
    final = {"succeeded", "failed", "cancelled"}
    await events.wait_for(lambda: all(set(events.kinds(j)) & final for j in (ok, bad)), 60, "both jobs end")
    assert events.kinds(ok)[-3:] == ["dispatched", "started", "succeeded"]
    assert data(events, ok, "succeeded")["exit_code"] == 0 and data(events, ok, "placed")["site"] == "hpc-slurm"
    assert data(events, bad, "failed")["exit_code"] == 3
    assert "FAILED" in data(events, bad, "failed")["reason"]
    assert data(events, ok, "started")["started_at"]
    # Slurm ran them, with the GPUs asked for
    assert slurm_job(ok)["JobState"] == "COMPLETED" and slurm_job(ok)["TresPerNode"] == "gres:gpu:h100:2"
    # the job named no memory, and none was asked of Slurm: the node's 4,000 MB are less than the 8 GB once sent
    assert slurm_job(ok)["MinMemoryNode"] == "0"
    assert slurm_job(bad)["JobState"] == "FAILED" and slurm_job(bad)["ExitCode"] == "3:0"
    await events.wait_for(lambda: ok in events.billed and bad in events.billed, 20, "both billed")


async def test_cancel_runs_scancel_and_walltime_ends_in_timeout(client):
    nc, events = client
    long = await submit(nc, spec(["sleep", "600"]))
    late = await submit(nc, spec(["sleep", "600"], walltime=60))  # Slurm counts walltime in minutes
    await events.wait_for(lambda: all("started" in events.kinds(j) for j in (long, late)), 60, "both started")
    reply = await request_json(nc, SUBJECTS.jobs_cancel, {"job_id": long, "reason": "no longer needed"})
    assert reply["state"] == "cancelling"
    await events.wait_for(lambda: "cancelled" in events.kinds(long), 30, "the cancel")
    assert data(events, long, "cancelled")["reason"] == "no longer needed"
    assert slurm_job(long)["JobState"] == "CANCELLED"
    # one minute of walltime, and Slurm's own check of time limits (every 30 s or so)
    await events.wait_for(lambda: "failed" in events.kinds(late), 150, "the walltime to end the job")
    assert data(events, late, "failed")["reason"].startswith("TIMEOUT")
    assert slurm_job(late)["JobState"] == "TIMEOUT"


async def test_a_full_slurm_with_a_queue_is_saturated_and_overflow_goes_private(client, slurm_cluster):
    nc, events = client
    # other users' work, straight into Slurm: every GPU for ten minutes, and more waiting behind
    for _ in range(2):
        subprocess.run(["sbatch", "--parsable", f"--partition={slurm_cluster}", "--gres=gpu:h100:8", "--time=10",
                        "--output=/dev/null", "--wrap", "sleep 600"], check=True, capture_output=True)
    await events.wait_for(lambda: any(e["type"] == "continuum.site.saturated" and e["subject"] == "hpc-slurm"
                                      for e in events.events), 30, "hpc-slurm saturated")

    async def forecast() -> dict:
        # the heartbeat that shows the GPUs taken may come before squeue lists the job that took them: until a
        # beat lists it, the wait for H100 is unknown (left out)
        while True:
            status = next(s for s in (await request_json(nc, SUBJECTS.sites_list, {}))["sites"]
                          if s["site_id"] == "hpc-slurm")
            if "H100" in status["est_wait_s_by_type"]:
                return status
            await asyncio.sleep(0.2)
    status = await asyncio.wait_for(forecast(), 10)
    assert status["saturated"] and status["queued"] >= 1 and status["gpus"]["H100"]["free"] == 0
    assert status["est_wait_s_by_type"]["H100"] > 60  # the running job's ten minutes, as forecast
    job = await submit(nc, spec(["true"], overflow="allowed", labels={"sim.runtime_s": "0"}))
    await events.wait_for(lambda: "placed" in events.kinds(job), 30, "the job placed")
    placed = data(events, job, "placed")
    assert placed["site"] == "cloud-fr" and placed["overflow"] is True
    reasons = {c["site"]: c["reasons"] for c in placed["decision"]["candidates"]}
    assert reasons["hpc-slurm"][0].startswith("saturated: ")
    await asyncio.wait_for(events.wait_for(lambda: job in events.billed, 30, "billed"), 40)


async def test_a_job_refused_for_good_by_the_only_site_fails_with_sbatchs_words(client):
    nc, events = client
    # more memory than the node has: only sbatch knows it (the catalog does not state the site's memory)
    big = await submit(nc, spec(["true"], resources={"gpus": 1, "gpu_type": "H100", "memory_gb": 64}))
    # more nodes than the site allows, which the catalog states: ineligible before any dispatch
    wide = await submit(nc, spec(["true"], resources={"gpus": 1, "gpu_type": "H100", "nodes": 2}))
    asked = await submit(nc, spec(["true"], resources={"gpus": 1, "gpu_type": "H100", "memory_gb": 2}))
    await events.wait_for(lambda: "failed" in events.kinds(big) and "rejected" in events.kinds(wide)
                          and "succeeded" in events.kinds(asked), 60, "the three jobs to end")
    assert events.kinds(big) == ["accepted", "placed", "dispatched", "requeued", "failed"]
    reason = data(events, big, "failed")["reason"]
    assert reason.startswith("refused by every site that could run it: hpc-slurm: site refused: sbatch: ")
    assert "Memory specification can not be satisfied" in reason
    assert data(events, big, "requeued")["refusal"] == "permanent"
    record = await record_when(nc, big, "failed")
    assert any("Memory specification can not be satisfied" in r for r in record["reasons"])

    assert events.kinds(wide) == ["accepted", "rejected"]
    assert "hpc-slurm: asks 2 nodes, the site allows at most 1 a job" in data(events, wide, "rejected")["reasons"]
    assert slurm_job(asked)["MinMemoryNode"] == "2G"


@pytest.fixture
def controller_down(slurm_cluster):
    """Slurm's controller stopped (its jobs kept on disk), and started again after the test."""
    subprocess.run(["pkill", "-x", "slurmctld"], check=True)
    script = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "test-cluster.sh"
    restarted = False

    def restart() -> None:
        nonlocal restarted
        if not restarted:
            subprocess.run(["bash", str(script), "restart-controller"], check=True, timeout=60)
            restarted = True
    yield restart
    restart()


async def test_a_passing_refusal_is_retried_with_backoff_and_the_job_runs_once(client, controller_down):
    nc, events = client
    job = await submit(nc, spec(["true"]))

    def refused() -> bool:
        return any(e["type"].endswith(".requeued") and e["data"].get("refusal") == "transient"
                   for e in events.by_job[job])
    await events.wait_for(refused, 60, "sbatch to fail while the controller is away")
    assert "Unable to contact slurm controller" in data(events, job, "requeued")["reason"]
    # while it waits, the job shows the site's own words
    record = await record_when(nc, job, "queued")
    assert record["state"] == "queued", record
    assert any("hpc-slurm: site refused: sbatch: " in r and "Unable to contact slurm controller" in r
               for r in record["reasons"]), record["reasons"]

    controller_down()
    await events.wait_for(lambda: "succeeded" in events.kinds(job), 120, "the job to run once the controller is back")
    assert events.kinds(job).count("started") == 1 and events.kinds(job).count("succeeded") == 1
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, check=True).stdout
    assert sum(f"JobName=continuum-{job} " in line for line in out.splitlines()) == 1


async def test_an_agent_waits_quietly_for_a_controller_naming_the_command_that_failed(controller_down):
    site = Catalog.load(CATALOG / "slurm_sites.yaml", CATALOG / "slurm_tenants.yaml").site("hpc-slurm")
    backend = SlurmBackend(site, reports=None)
    with capture_logs() as logs:
        assert await backend._poll_once() is False
    (said,) = [e for e in logs if e["event"].startswith("slurm.")]
    assert said["event"] == "slurm.waiting_for_controller" and said["log_level"] == "info"
    assert said["error"].startswith("scontrol -o show job exited 1: ")
    assert "Unable to contact slurm controller" in said["error"]

    controller_down()
    with capture_logs() as logs:
        assert await backend._poll_once() is True  # and from now on, a failure is a warning
    assert not [e for e in logs if e["event"].startswith("slurm.") and e["log_level"] != "info"]


async def test_a_job_of_steps_and_files_runs_in_slurm_and_leaves_its_output(files_system, tmp_path):
    """What the TES gateway sends: a job script as content, steps (one ignoring its error), an output."""
    nc = await connect_when_up(files_system)
    events = await listen(nc)
    files = tmp_path / "files"
    script = f"{files}/w/job.sh"
    ok = await submit(nc, spec(["sh", script], steps=[
        {"command": ["sh", script], "workdir": f"{files}/w", "stdout": f"{files}/w/log", "env": {"WHO": "slurm"}},
        {"command": ["sh", "-c", "exit 1"], "ignore_error": True},
        {"command": ["sh", "-c", "tr a-z A-Z < log > result"], "workdir": f"{files}/w"}],
        inputs=[{"path": script, "content": 'echo "snakemake on $WHO"\n'}],
        outputs=[{"path": f"{files}/w/result", "url": f"file://{files}/results/result"}]))
    bad = await submit(nc, spec(["sh", "-c", "exit 4"], steps=[
        {"command": ["sh", "-c", "exit 4"]}, {"command": ["touch", f"{files}/never"]}]))
    final = {"succeeded", "failed", "cancelled"}
    await events.wait_for(lambda: all(set(events.kinds(j)) & final for j in (ok, bad)), 60, "both jobs end")
    await nc.close()
    assert events.kinds(ok)[-1] == "succeeded", [e["data"].get("reason") for e in events.by_job[ok]]
    assert (files / "results" / "result").read_text() == "SNAKEMAKE ON SLURM\n"
    assert data(events, bad, "failed")["exit_code"] == 4 and not (files / "never").exists()
    assert slurm_job(bad)["ExitCode"] == "4:0"
