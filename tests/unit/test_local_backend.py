"""services/agent/backends/local.py and services/agent/staging.py: a job's steps run as real processes one after
another, its files staged beneath the site's files_root and nowhere else (no bus: the backend reports to an
in-memory Reports)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.agent.backends.base import Outcome
from services.agent.backends.local import LocalBackend
from shared.contracts.catalog import SiteEntry
from shared.contracts.jobs import Dispatch, JobSpec
from tests.fakes import MemoryReports


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "w").mkdir(parents=True)
    return tmp_path / "root"


def site(root: Path) -> SiteEntry:
    return SiteEntry(id="local", kind="private_cloud", country="FR", jurisdiction="EU", carbon_g_per_kwh=50,
                     backend="local", gpus={"L4": 2}, files_root=str(root))


def sh(script: str, **step) -> dict:
    return {"command": ["sh", "-c", script], **step}


def job(*steps: dict, **spec) -> Dispatch:
    body = JobSpec(tenant="acme", command=steps[0]["command"], steps=list(steps),
                   resources={"gpus": 1, "gpu_type": "L4"}, **{"walltime_s": 60, **spec})
    return Dispatch(job_id="j", tenant="acme", site="local", gpu_type="L4", attempt=0, spec=body)


async def run(root: Path, order: Dispatch) -> Outcome:
    reports = MemoryReports()
    await LocalBackend(site(root), reports).submit(order)
    return await reports.outcome(order.job_id, timeout_s=30)


def url(path: Path) -> str:
    return f"file://{path}"


# --- steps ---------------------------------------------------------------------------------------------------

async def test_steps_run_one_after_another_each_seeing_what_the_one_before_left(root):
    w = str(root / "w")
    outcome = await run(root, job(sh("echo one > a.txt", workdir=w),
                                  sh("cat a.txt > b.txt && echo two >> b.txt", workdir=w)))
    assert outcome == Outcome(0)
    assert (root / "w" / "b.txt").read_text() == "one\ntwo\n"


async def test_a_failing_step_ends_the_job_with_its_exit_code_and_the_rest_never_run(root):
    outcome = await run(root, job(sh("true"), sh("exit 3"), sh(f"touch {root}/ran")))
    assert (outcome.exit_code, outcome.reason) == (3, "steps.1: exited 3")
    assert not (root / "ran").exists()


async def test_a_step_that_ignores_its_error_lets_the_job_go_on_and_does_not_count(root):
    outcome = await run(root, job(sh("exit 5", ignore_error=True), sh(f"touch {root}/ran"),
                                  sh("exit 6", ignore_error=True)))
    assert outcome == Outcome(0)  # the last step that counts exited 0
    assert (root / "ran").exists()
    outcome = await run(root, job(sh("exit 5", ignore_error=True), sh("exit 7"), sh(f"touch {root}/never")))
    assert outcome.exit_code == 7 and not (root / "never").exists()
    outcome = await run(root, job(sh("true"), {"command": ["/no/such/program"], "ignore_error": True}))
    assert outcome == Outcome(0)  # even a step that cannot start


async def test_a_step_that_cannot_start_fails_the_job_naming_it(root):
    outcome = await run(root, job(sh("true"), {"command": ["/no/such/program"]}))
    assert outcome.exit_code == 127 and outcome.reason.startswith("steps.1: cannot start '/no/such/program'")


async def test_stdout_and_stderr_go_to_their_files_and_stdin_comes_from_one(root):
    out, err, both = root / "logs" / "out.txt", root / "logs" / "err.txt", root / "both.txt"
    outcome = await run(root, job(sh("echo out; echo err >&2", stdout=str(out), stderr=str(err)),
                                  sh("echo out; echo err >&2", stdout=str(both), stderr=str(both)),
                                  sh("tr a-z A-Z", stdin=str(root / "in.txt"), stdout=str(root / "upper.txt")),
                                  inputs=[{"path": str(root / "in.txt"), "content": "hello\n"}]))
    assert outcome == Outcome(0)
    assert (out.read_text(), err.read_text()) == ("out\n", "err\n")
    assert both.read_text() == "out\nerr\n"  # one file, neither line written over the other
    assert (root / "upper.txt").read_text() == "HELLO\n"


async def test_a_step_adds_its_env_but_the_job_keeps_its_gpu_slots(root):
    w = str(root / "w")
    script = 'echo "$CUDA_VISIBLE_DEVICES $GREETING $CONTINUUM_JOB_ID" > env.txt'
    outcome = await run(root, job(sh(script, workdir=w, env={"CUDA_VISIBLE_DEVICES": "7", "GREETING": "hi"})))
    assert outcome == Outcome(0)
    assert (root / "w" / "env.txt").read_text() == "0 hi j\n"


async def test_the_walltime_covers_every_step(root):
    pid_file = root / "pid"
    outcome = await run(root, job(sh("true"), sh(f"echo $$ > {pid_file}; exec sleep 120"), sh(f"touch {root}/late"),
                                  walltime_s=1))
    assert outcome == Outcome(None, "walltime exceeded")
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists() and not (root / "late").exists()


async def test_a_cancel_stops_the_step_that_runs_and_the_rest_never_start(root):
    pid_file = root / "pid"
    reports = MemoryReports()
    backend = LocalBackend(site(root), reports)
    await backend.submit(job(sh("true"), sh(f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 120"),
                             sh(f"touch {root}/late")))
    async with asyncio.timeout(10):
        while not pid_file.exists():  # a file, not an event: look again until it is there
            await asyncio.sleep(0.02)
    assert await backend.cancel("j", "not needed")
    assert await reports.outcome("j") == Outcome(None, "not needed", cancelled=True)
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists() and not (root / "late").exists()


# --- files in and out ----------------------------------------------------------------------------------------

async def test_a_content_input_is_written_where_the_step_reads_it(root):
    script = root / "w" / "job.sh"  # as Snakemake sends its job script
    outcome = await run(root, job({"command": ["sh", str(script)], "workdir": str(root / "w")},
                                  inputs=[{"path": str(script), "content": "echo from-content > out.txt\n"}]))
    assert outcome == Outcome(0)
    assert (root / "w" / "out.txt").read_text() == "from-content\n"


async def test_a_file_url_input_is_copied_to_its_path(root):
    (root / "shared").mkdir()
    (root / "shared" / "data.txt").write_text("data\n")
    target = root / "w" / "in" / "data.txt"  # its directory made
    outcome = await run(root, job(sh(f"cat {target} > {root}/seen.txt"),
                                  inputs=[{"path": str(target), "url": url(root / "shared" / "data.txt")}]))
    assert outcome == Outcome(0)
    assert (root / "seen.txt").read_text() == "data\n" and (root / "shared" / "data.txt").read_text() == "data\n"


async def test_an_output_is_copied_to_its_url(root):
    result = root / "w" / "result.txt"
    outcome = await run(root, job(sh(f"echo result > {result}"),
                                  outputs=[{"path": str(result), "url": url(root / "results" / "run1" / "r.txt")}]))
    assert outcome == Outcome(0)
    assert (root / "results" / "run1" / "r.txt").read_text() == "result\n"


async def test_an_output_the_job_did_not_leave_fails_it_with_the_reason(root):
    missing = root / "w" / "never-written"
    outputs = [{"path": str(missing), "url": url(root / "out")}]
    outcome = await run(root, job(sh("true"), outputs=outputs))
    assert outcome.exit_code is None  # a system failure: its steps did their part
    assert outcome.reason == f"cannot stage the job's outputs: outputs.0.path: {missing}: No such file or directory"
    # a job that failed keeps its exit code, and what it did leave is copied out
    (root / "w" / "log").write_text("why\n")
    outputs.append({"path": str(root / "w" / "log"), "url": url(root / "log")})
    outcome = await run(root, job(sh("exit 2"), outputs=outputs))
    assert outcome.exit_code == 2 and (root / "log").read_text() == "why\n"


async def test_a_fifo_where_an_output_should_be_is_refused_rather_than_read_forever(root):
    fifo = root / "w" / "out"
    outcome = await run(root, job(sh(f"mkfifo {fifo}"), outputs=[{"path": str(fifo), "url": url(root / "copy")}]))
    assert outcome.reason == f"cannot stage the job's outputs: outputs.0.path: {fifo}: is not a regular file"


# --- nowhere but beneath files_root --------------------------------------------------------------------------

@pytest.fixture(params=["absolute", "relative"])
def secret(request, root: Path) -> Path:
    """A file outside the root that the agent must neither read nor write, and `root/link` leading to its
    directory (by an absolute or a relative symlink)."""
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret").write_text("the agent's credentials\n")
    (root / "link").symlink_to(outside if request.param == "absolute" else Path("..") / "outside")
    return outside / "secret"


def refused(path: Path, root: Path) -> str:
    return f"{path}: leads outside {root} through a symlink"


async def test_an_input_written_through_a_symlink_leading_outside_is_refused(root, secret):
    path = root / "link" / "secret"
    outcome = await run(root, job(sh("true"), inputs=[{"path": str(path), "content": "overwritten"}]))
    assert outcome == Outcome(None, f"cannot stage the job's inputs: inputs.0.path: {refused(path, root)}")
    assert secret.read_text() == "the agent's credentials\n"


async def test_an_input_copied_from_a_symlink_leading_outside_is_refused(root, secret):
    (root / "w" / "steal").symlink_to(secret)  # the file itself a symlink this time
    source = root / "w" / "steal"
    outcome = await run(root, job(sh("true"), inputs=[{"path": str(root / "w" / "got"), "url": url(source)}]))
    assert outcome == Outcome(None, f"cannot stage the job's inputs: inputs.0.url: {refused(source, root)}")
    assert not (root / "w" / "got").exists()


async def test_an_output_copied_through_a_symlink_leading_outside_is_refused(root, secret):
    (root / "w" / "r").write_text("tenant's data")
    target = root / "link" / "secret"
    outcome = await run(root, job(sh("true"), outputs=[{"path": str(root / "w" / "r"), "url": url(target)}]))
    assert outcome == Outcome(None, f"cannot stage the job's outputs: outputs.0.url: {refused(target, root)}")
    assert secret.read_text() == "the agent's credentials\n"


async def test_a_redirection_through_a_symlink_leading_outside_is_refused(root, secret):
    # a symlink the job's first step makes itself, where its second step's stdout goes
    out = root / "w" / "made" / "x"
    outcome = await run(root, job(sh(f"rmdir {out.parent} && ln -s {secret.parent} {out.parent}"),
                                  sh("echo pwned", stdout=str(out))))
    assert outcome == Outcome(None, f"steps.1.stdout: {refused(out, root)}")
    assert secret.read_text() == "the agent's credentials\n"


async def test_a_symlink_that_stays_beneath_the_root_is_followed(root):
    (root / "inner").symlink_to(root / "w")
    (root / "w" / "up").symlink_to(Path("..") / "w")  # relative, with a `..` that stays beneath the root
    outcome = await run(root, job(sh("true"), inputs=[{"path": str(root / "inner" / "up" / "x"), "content": "ok"}]))
    assert outcome == Outcome(0)
    assert (root / "w" / "x").read_text() == "ok"


async def test_a_job_whose_files_the_site_cannot_stage_never_runs(root):
    elsewhere = root.parent / "elsewhere"
    outcome = await run(root, job(sh(f"touch {root}/ran"), inputs=[{"path": str(elsewhere), "content": "x"}]))
    assert outcome == Outcome(None, f"cannot stage the job's files: inputs.0.path is outside {root}")
    assert not elsewhere.exists() and not (root / "ran").exists()
    assert os.listdir(root) == ["w"]
