"""Every service in this process, on a real nats-server, with a `local` site that runs real processes."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import nats
import pytest
import yaml

from services.runtime import _factories
from shared.bus import request_json
from shared.settings import Settings
from tests.conftest import SUBJECTS, listen

pytestmark = pytest.mark.integration
CATALOG = Path(__file__).parent / "catalog"


@pytest.fixture
async def client(nats_server, tmp_path):
    async for connected in system(nats_server, tmp_path, CATALOG / "sites.yaml"):
        yield connected


@pytest.fixture
async def files_client(nats_server, tmp_path):
    """The same system, its local site staging files beneath `tmp_path/files`."""
    sites = yaml.safe_load((CATALOG / "sites.yaml").read_text())
    sites["sites"][0]["files_root"] = str(tmp_path / "files")
    (tmp_path / "files").mkdir()
    (tmp_path / "sites.yaml").write_text(yaml.safe_dump(sites))
    async for connected in system(nats_server, tmp_path, tmp_path / "sites.yaml"):
        yield connected


async def system(nats_server, tmp_path: Path, sites_file: Path):
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, sites_file=sites_file,
                        tenants_file=CATALOG / "tenants.yaml", heartbeat_interval_s=0.2, placement_retry_s=0.1)
    async with AsyncExitStack() as stack:
        for name, factory in _factories().items():
            if name != "gateway":  # HTTP: the tests of this file speak NATS
                await stack.enter_async_context(factory(settings))
        nc = await nats.connect(nats_server.url)
        stack.push_async_callback(nc.close)
        events = await listen(nc)
        await events.wait_for(lambda: any(e["type"] == "continuum.site.up" for e in events.events), 10,
                              "the local site to come up")
        yield nc, events


def python(code: str, **spec) -> dict:
    return {"tenant": "team", "command": [sys.executable, "-c", code], "resources": {"gpus": 1, "gpu_type": "L4"},
            "walltime_s": 60, **spec}


def long_job(tmp_path: Path) -> tuple[str, Path]:
    """Python code for a job that writes its pid to a file and runs for two minutes, and that file."""
    pid_file = tmp_path / "pid"
    return f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)", \
        pid_file


async def pid_written(pid_file: Path) -> int:
    deadline = asyncio.get_running_loop().time() + 10
    while not pid_file.exists():  # a file, not an event: look again until it is there
        assert asyncio.get_running_loop().time() < deadline, "the process never wrote its pid"
        await asyncio.sleep(0.05)
    return int(pid_file.read_text())


async def run(client, spec: dict, until: str) -> tuple[str, dict]:
    nc, events = client
    reply = await request_json(nc, SUBJECTS.jobs_submit, spec)
    assert reply["state"] == "accepted", reply
    job_id = reply["job_id"]
    await events.wait_for(lambda: until in events.kinds(job_id), 30, f"{until} of {job_id}")
    return job_id, next(e for e in events.by_job[job_id] if e["type"].endswith(until))["data"]


async def test_a_process_that_exits_non_zero_fails_with_its_exit_code(client):
    _, data = await run(client, python("import sys; sys.exit(3)"), "failed")
    assert data["exit_code"] == 3 and data["site"] == "workstation"


async def test_the_job_sees_its_gpu_slots_in_cuda_visible_devices(client, tmp_path):
    out = tmp_path / "devices"
    code = f"import os, pathlib; pathlib.Path({str(out)!r}).write_text(os.environ['CUDA_VISIBLE_DEVICES'])"
    _, data = await run(client, python(code, resources={"gpus": 2, "gpu_type": "L4"}), "succeeded")
    assert data["exit_code"] == 0
    assert sorted(out.read_text().split(",")) == ["0", "1"]


async def test_a_job_past_its_walltime_is_killed_and_fails(client, tmp_path):
    code, pid_file = long_job(tmp_path)
    _, data = await run(client, python(code, walltime_s=1), "failed")
    assert data["reason"] == "walltime exceeded"
    assert not Path(f"/proc/{await pid_written(pid_file)}").exists()


async def test_cancel_kills_the_running_process(client, tmp_path):
    nc, events = client
    code, pid_file = long_job(tmp_path)
    job_id, _ = await run(client, python(code), "started")
    pid = await pid_written(pid_file)
    answer = await request_json(nc, SUBJECTS.jobs_cancel, {"job_id": job_id, "reason": "not needed"})
    assert answer["state"] == "cancelling"
    await events.wait_for(lambda: "cancelled" in events.kinds(job_id), 30, "the cancellation")
    assert not Path(f"/proc/{pid}").exists()
    await events.wait_for(lambda: job_id in events.billed, 10, "the usage line of the cancelled run")


async def test_a_command_that_cannot_start_fails_with_a_reason(client):
    _, data = await run(client, {"tenant": "team", "command": ["/no/such/program"],
                                 "resources": {"gpus": 1, "gpu_type": "L4"}}, "failed")
    assert data["exit_code"] == 127 and "cannot start" in data["reason"]


async def test_an_agent_that_stops_gives_its_running_jobs_back(nats_server, tmp_path):
    """A restart of a site agent must not cancel users' work: the job is requeued and its process ends."""
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, sites_file=CATALOG / "sites.yaml",
                        tenants_file=CATALOG / "tenants.yaml", heartbeat_interval_s=0.2, placement_retry_s=0.1)
    factories = _factories()
    async with AsyncExitStack() as stack:
        for name in ("intake", "capacity", "routing", "billing"):
            await stack.enter_async_context(factories[name](settings))
        agent = factories["agent"](settings)
        await agent.start()
        nc = await nats.connect(nats_server.url)
        stack.push_async_callback(nc.close)
        events = await listen(nc)
        await events.wait_for(lambda: any(e["type"] == "continuum.site.up" for e in events.events), 10, "site up")
        code, pid_file = long_job(tmp_path)
        job_id, _ = await run((nc, events), python(code), "started")
        pid = await pid_written(pid_file)
        await agent.stop()
        await events.wait_for(lambda: "requeued" in events.kinds(job_id), 30, "the job to be given back")
        requeued = next(e for e in events.by_job[job_id] if e["type"].endswith(".requeued"))["data"]
        assert requeued["reason"] == "site agent stopped" and requeued["attempt"] == 1
        assert "cancelled" not in events.kinds(job_id)
        assert not Path(f"/proc/{pid}").exists()


async def test_a_job_of_steps_and_files_runs_at_the_local_site_and_leaves_its_output(files_client, tmp_path):
    """What the TES gateway sends: a job script as content, two steps, an output to a file:// URL."""
    files = tmp_path / "files"
    script = f"{files}/w/job.sh"
    body = python("", command=["sh", script], steps=[
        {"command": ["sh", script], "workdir": f"{files}/w", "stdout": f"{files}/w/log"},
        {"command": ["sh", "-c", "exit 1"], "ignore_error": True},
        {"command": ["sh", "-c", "tr a-z A-Z < log > result"], "workdir": f"{files}/w"}],
        inputs=[{"path": script, "content": "echo snakemake\n"}],
        outputs=[{"path": f"{files}/w/result", "url": f"file://{files}/results/result"}])
    job_id, data = await run(files_client, body, "succeeded")
    assert data["exit_code"] == 0
    assert (files / "results" / "result").read_text() == "SNAKEMAKE\n"
    _, events = files_client
    accepted = next(e for e in events.by_job[job_id] if e["type"].endswith(".accepted"))["data"]
    assert [s["command"] for s in accepted["spec"]["steps"]][1] == ["sh", "-c", "exit 1"]


async def test_a_job_whose_files_lie_outside_the_sites_files_root_is_rejected_with_the_field(files_client, tmp_path):
    body = python("", inputs=[{"path": f"{tmp_path}/files/in", "url": "file:///etc/passwd"}])
    _, data = await run(files_client, body, "rejected")
    assert data["reasons"] == [f"workstation: inputs.0.url is outside {tmp_path}/files"]


async def test_a_job_with_files_is_rejected_where_no_site_stages_files(client, tmp_path):
    _, data = await run(client, python("", outputs=[{"path": "/srv/out", "url": "file:///srv/results/out"}]),
                        "rejected")
    assert data["reasons"] == ["workstation: stages no files (outputs.0)"]


async def test_a_url_of_another_scheme_is_refused_at_submission_naming_the_field(client):
    nc, _ = client
    reply = await request_json(nc, SUBJECTS.jobs_submit,
                               python("", inputs=[{"path": "/srv/in", "url": "s3://bucket/in"}]))
    assert reply["state"] == "rejected"
    assert reply["errors"] == [{"loc": ["inputs", 0, "url"], "msg": "only file:// URLs are supported"}]
