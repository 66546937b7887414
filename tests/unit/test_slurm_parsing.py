"""services/agent/backends/slurm.py: sbatch options and the batch script, reading scontrol and sinfo on real output
lines, and the files the agent stages for a job (without a Slurm: tests/e2e/test_slurm.py has one)."""

from __future__ import annotations

import base64
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.agent.backends.base import SubmitError
from services.agent.backends.slurm import (
    COMMENT_MAX,
    CommandError,
    SlurmBackend,
    SlurmView,
    Tracked,
    batch_script,
    is_transient,
    outcome_of,
    parse_gres,
    parse_jobs,
    refusal_words,
    sbatch_args,
)
from shared.contracts.catalog import SiteEntry, SlurmOptions
from shared.contracts.jobs import Dispatch, JobSpec
from tests.fakes import MemoryReports

# lines as Slurm 22.05 printed them on this machine (shortened to the fields that matter, order kept)
RUNNING = ("JobId=8 JobName=continuum-abc UserId=root(0) JobState=RUNNING Reason=None ExitCode=0:0 RunTime=00:00:00 "
           "TimeLimit=00:02:00 SubmitTime=2026-11-25T17:48:44 StartTime=2026-11-25T17:48:45 "
           "EndTime=2026-11-25T17:50:45 Partition=gpu NodeList=continuum NumNodes=1 NumCPUs=1 "
           "Comment=eyJhIjoxfQ==  StdErr=/dev/null TresPerNode=gres:gpu:h100:3 ")
PENDING = ("JobId=9 JobName=wrap JobState=PENDING Reason=Resources ExitCode=0:0 TimeLimit=1-02:00:00 "
           "StartTime=Unknown EndTime=Unknown Partition=gpu NodeList= NumNodes=2 TresPerNode=gres:gpu:h100:6 ")
FAILED = ("JobId=1 JobName=wrap JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 TimeLimit=00:01:00 "
          "StartTime=2026-11-25T17:35:21 EndTime=2026-11-25T17:35:22 Partition=gpu NumNodes=1 ")

SITE = SiteEntry(id="jz", kind="public_hpc", country="FR", jurisdiction="EU", carbon_zone="FR", backend="slurm",
                 gpus={"H100": 8}, slurm=SlurmOptions(partition="gpu_p", account="abc@h100"))


def order(**resources) -> Dispatch:
    spec = JobSpec(tenant="lab", command=["python", "train.py", "--lr", "3e-4"], walltime_s=3601,
                   resources={"gpus": 4, "gpu_type": "H100", "nodes": 2, "cpus": 8, "memory_gb": 64, **resources})
    return Dispatch(job_id="j1", tenant="lab", site="jz", gpu_type="H100", attempt=2, spec=spec)


def test_sbatch_options_from_the_jobspec():
    args = sbatch_args(order(), SITE, "/tmp/out")
    assert not any(a.startswith("--qos") for a in args)
    assert {"--parsable", "--job-name=continuum-j1", "--time=61", "--nodes=2", "--cpus-per-task=8",
            "--mem=65536M", "--output=/tmp/out", "--gres=gpu:h100:4", "--partition=gpu_p", "--account=abc@h100",
            "--no-requeue", "--export=ALL,CONTINUUM_JOB_ID=j1"} <= set(args)
    comment = next(a for a in args if a.startswith("--comment="))[len("--comment="):]
    assert Dispatch.model_validate_json(base64.b64decode(comment)) == order()


def test_a_job_without_gpus_asks_no_gres():
    assert not any(a.startswith("--gres") for a in sbatch_args(order(gpus=0), SITE, "/tmp/out"))


def asked(spec: dict, site: SiteEntry = SITE) -> set[str]:
    """The resource options sbatch gets for a job of one node asking 2 H100 and `spec`."""
    dispatch = Dispatch(job_id="j1", tenant="lab", site="jz", gpu_type="H100", attempt=0,
                        spec=JobSpec(tenant="lab", command=["true"], resources={"gpus": 2, "gpu_type": "H100", **spec}))
    return {a.split("=")[0] for a in sbatch_args(dispatch, site, "/tmp/out")} & {
        "--nodes", "--cpus-per-task", "--cpus-per-gpu", "--mem", "--mem-per-gpu"}


def test_what_a_job_does_not_ask_for_is_not_sent_so_the_sites_defaults_apply():
    assert asked({}) == set()  # not even one node: Slurm's default
    assert asked({"memory_gb": 4}) == {"--mem"}
    assert asked({"cpus": 4, "nodes": 2}) == {"--cpus-per-task", "--nodes"}


def test_a_sites_catalog_defaults_fill_in_only_what_the_job_leaves_unset():
    jz = SITE.model_copy(update={"slurm": SlurmOptions(partition="gpu_p", mem_per_gpu_gb=40, cpus_per_gpu=10)})
    assert asked({}, jz) == {"--mem-per-gpu", "--cpus-per-gpu"}
    assert asked({"memory_gb": 16, "cpus": 2}, jz) == {"--mem", "--cpus-per-task"}
    dispatch = Dispatch(job_id="j1", tenant="lab", site="jz", gpu_type="H100", attempt=0,
                        spec=JobSpec(tenant="lab", command=["true"], resources={"gpus": 2, "gpu_type": "H100"}))
    assert {"--mem-per-gpu=40960M", "--cpus-per-gpu=10"} <= set(sbatch_args(dispatch, jz, "/tmp/out"))


def test_gres_types_and_qos_follow_the_sites_slurm_names():
    named = SITE.model_copy(update={"slurm": SlurmOptions(qos="qos_gpu-t3", gres_type_map={"H100": "h100_80g"})})
    assert {"--qos=qos_gpu-t3", "--gres=gpu:h100_80g:4"} <= set(sbatch_args(order(), named, "/tmp/out"))
    untyped = SITE.model_copy(update={"slurm": SlurmOptions(gres_type_map={"H100": ""})})
    assert "--gres=gpu:4" in sbatch_args(order(), untyped, "/tmp/out")


@pytest.mark.parametrize(("said", "transient"), [
    # as Slurm 22.05's sbatch said them on this machine
    (("sbatch: error: Memory specification can not be satisfied\n"
      "sbatch: error: Batch job submission failed: Requested node configuration is not available"), False),
    (("sbatch: error: invalid partition specified: nope\n"
      "sbatch: error: Batch job submission failed: Invalid partition name specified"), False),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified", False),
    ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)", True),
    ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", True),
    ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", True),
])
def test_a_refusal_is_permanent_unless_slurm_says_it_may_pass(said, transient):
    words = refusal_words(said)
    assert words.startswith("sbatch: ") and "error:" not in words
    assert is_transient(words) is transient


def test_sbatch_words_read_as_one_line():
    assert refusal_words("sbatch: error: Memory specification can not be satisfied\n"
                         "sbatch: error: Batch job submission failed: Requested node configuration is not available"
                         ) == ("sbatch: Memory specification can not be satisfied; Batch job submission failed: "
                               "Requested node configuration is not available")
    assert refusal_words("") == "sbatch: refused the job without a word"


def test_a_failed_command_says_which_with_its_exit_code_even_when_it_said_nothing():
    assert str(CommandError(["sinfo", "-N", "-h"], 1, "", "")) == "sinfo -N -h exited 1: no output"
    assert str(CommandError(("scontrol", "-o", "show", "job"), 1, "",
                            "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")) == (
        "scontrol -o show job exited 1: slurm_load_jobs error: Unable to contact slurm controller (connect failure)")


def test_scontrol_lines_are_read():
    jobs = parse_jobs("\n".join([RUNNING, PENDING, FAILED]))
    running, pending, failed = jobs["8"], jobs["9"], jobs["1"]
    assert (running.name, running.state, running.gpus, running.time_limit_s) == ("continuum-abc", "RUNNING",
                                                                                   {"h100": 3}, 120)
    assert running.start == datetime.fromisoformat("2026-11-25T17:48:45").astimezone(UTC)
    assert running.submitted == datetime.fromisoformat("2026-11-25T17:48:44").astimezone(UTC)
    assert (pending.start, pending.time_limit_s, pending.nodes, pending.gpus) == (None, 26 * 3600, 2, {"h100": 6})
    assert (failed.exit_code, failed.reason) == (3, "NonZeroExitCode")


def test_only_continuum_jobs_with_a_readable_comment_have_an_order():
    comment = base64.b64encode(order().model_dump_json().encode()).decode()
    jobs = parse_jobs(RUNNING.replace("Comment=eyJhIjoxfQ==", f"Comment={comment}") + "\n" + PENDING)
    assert jobs["8"].order == order()
    assert jobs["9"].order is None
    assert parse_jobs(RUNNING)["8"].order is None  # a comment that is not a Dispatch


def test_sinfo_gres_totals_and_use_skip_nodes_that_are_down():
    text = ("n1 |gpu:h100:8 |gpu:h100:6(IDX:0-5) |mixed\n"
            "n2 |gpu:h100:8,gpu:a100:4 |gpu:h100:0(IDX:N/A),gpu:a100:1(IDX:2) |idle\n"
            "n3 |gpu:h100:8 |gpu:h100:0 |down*\n")
    assert parse_gres(text) == ({"h100": 16, "a100": 4}, {"h100": 6, "a100": 1})


@pytest.mark.parametrize(("line", "expected"), [
    ("JobState=COMPLETED ExitCode=0:0", (0, None, False, False)),
    ("JobState=COMPLETED ExitCode=0:0 Reason=None", (0, None, False, False)),
    ("JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0", (3, "FAILED: NonZeroExitCode", False, False)),
    ("JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15", (None, "TIMEOUT: TimeLimit (signal 15)", False, False)),
    ("JobState=OUT_OF_MEMORY Reason=OutOfMemory ExitCode=0:125", (None, "OUT_OF_MEMORY: OutOfMemory (signal 125)",
                                                                  False, False)),
    ("JobState=NODE_FAIL Reason=None ExitCode=0:0", (None, "NODE_FAIL", False, False)),
    ("JobState=CANCELLED Reason=None ExitCode=0:15", (None, "CANCELLED", True, False)),
    ("JobState=PREEMPTED Reason=None ExitCode=0:0", (None, "PREEMPTED by Slurm", False, True)),
])
def test_slurm_states_map_to_outcomes(line, expected):
    job = parse_jobs(f"JobId=5 JobName=x {line}")["5"]
    outcome = outcome_of(job)
    assert (outcome.exit_code, outcome.reason, outcome.cancelled, outcome.requeue) == expected


# --- steps and files: the batch script, staging by the agent ----------------------------------------------------

def run_script(spec: JobSpec, tmp_path: Path, **env: str) -> int:
    """The batch script as Slurm's node runs it: by sh, with what Slurm sets in `env`, its exit code the job's."""
    (tmp_path / "script").write_text(batch_script(spec))
    return subprocess.run(["sh", str(tmp_path / "script")], stdin=subprocess.DEVNULL, capture_output=True,
                          cwd=tmp_path, env=dict(os.environ, **env), check=False).returncode


def steps_spec(*steps: dict, **fields) -> JobSpec:
    return JobSpec(tenant="lab", command=steps[0]["command"], steps=list(steps), **fields)


def sh(script: str, **step) -> dict:
    return {"command": ["sh", "-c", script], **step}


def test_a_job_without_steps_runs_its_command_as_it_always_did():
    assert batch_script(order().spec) == "#!/bin/sh\nexec python train.py --lr 3e-4\n"


def test_the_script_runs_the_steps_in_order_with_their_workdir_env_and_redirections(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (tmp_path / "in").write_text("hello\n")
    spec = steps_spec(sh("echo one > a.txt; echo \"$GREETING\" >&2", workdir=str(w), env={"GREETING": "it's me"},
                         stderr=str(tmp_path / "err")),
                      sh("cat a.txt; tr a-z A-Z", workdir=str(w), stdin=str(tmp_path / "in"),
                         stdout=str(tmp_path / "out"), stderr=str(tmp_path / "out")))
    assert run_script(spec, tmp_path) == 0
    assert (tmp_path / "err").read_text() == "it's me\n"
    assert (tmp_path / "out").read_text() == "one\nHELLO\n"


def test_the_script_stops_at_the_first_step_that_counts_and_fails_with_its_exit_code(tmp_path):
    assert run_script(steps_spec(sh("true"), sh("exit 3"), sh("touch ran")), tmp_path) == 3
    assert not (tmp_path / "ran").exists()
    assert run_script(steps_spec(sh("exit 5", ignore_error=True), sh("touch ran"), sh("exit 6", ignore_error=True)),
                      tmp_path) == 0
    assert (tmp_path / "ran").exists()
    assert run_script(steps_spec(sh("exit 5", ignore_error=True), sh("exit 7"), sh("touch never")), tmp_path) == 7
    assert not (tmp_path / "never").exists()


def test_a_steps_env_never_overrides_what_slurm_sets_for_the_job(tmp_path):
    spec = steps_spec(sh('echo "$CUDA_VISIBLE_DEVICES $A" > gpus', env={"CUDA_VISIBLE_DEVICES": "7", "A": "1"}))
    assert run_script(spec, tmp_path, CUDA_VISIBLE_DEVICES="0,1") == 0
    assert (tmp_path / "gpus").read_text() == "0,1 1\n"


def comment_of(order: Dispatch) -> str:
    return next(a for a in sbatch_args(order, SITE, "/tmp/out") if a.startswith("--comment="))[len("--comment="):]


def test_the_comment_leaves_out_the_inputs_staged_already_and_the_steps_in_the_script():
    files = JobSpec(tenant="lab", command=["x"], inputs=[{"path": "/srv/job.sh", "content": "x" * 60_000}],
                    steps=[{"command": ["x"], "stdout": "/srv/log"}], outputs=[{"path": "/srv/o", "url": "file:///srv/r"}])
    with_files = order(gpus=1).model_copy(update={"spec": files})
    comment = comment_of(with_files)
    assert len(comment) <= COMMENT_MAX
    kept = parse_jobs(f"JobId=5 JobName=continuum-j1 Comment={comment}")["5"].order
    assert kept is not None and (kept.spec.inputs, kept.spec.steps, kept.spec.outputs) == ([], [], files.outputs)


def test_a_comment_too_long_for_slurm_is_compressed_and_one_still_too_long_refused_for_good():
    # Slurm refuses a comment of more than 1,024 characters: a long command once made such a job unsubmittable
    outputs = [{"path": f"/scratch/lab/w/sample{i}.bam", "url": f"file:///scratch/lab/results/sample{i}.bam"}
               for i in range(20)]
    many = order().model_copy(update={"spec": JobSpec(tenant="lab", command=["python", "x" * 400], outputs=outputs)})
    assert len(base64.b64encode(many.model_dump_json().encode())) > COMMENT_MAX
    comment = comment_of(many)
    assert len(comment) <= COMMENT_MAX
    assert parse_jobs(f"JobId=5 JobName=continuum-j1 Comment={comment}")["5"].order == many
    assert comment_of(order()) == base64.b64encode(order().model_dump_json().encode()).decode()  # as it always was
    noise = [{"path": f"/srv/{os.urandom(24).hex()}", "url": f"file:///srv/{os.urandom(24).hex()}"} for _ in range(40)]
    with pytest.raises(SubmitError, match="does not fit Slurm's comment") as refused:
        comment_of(order().model_copy(update={"spec": JobSpec(tenant="lab", command=["x"], outputs=noise)}))
    assert refused.value.permanent


def files_site(root: Path) -> SiteEntry:
    return SITE.model_copy(update={"files_root": str(root)})


def files_order(**fields) -> Dispatch:
    spec = JobSpec(tenant="lab", command=["true"], resources={"gpus": 1, "gpu_type": "H100"}, **fields)
    return Dispatch(job_id="j", tenant="lab", site="jz", gpu_type="H100", attempt=0, spec=spec)


async def test_an_input_that_cannot_be_staged_is_the_sites_refusal_for_good_before_any_sbatch(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    backend = SlurmBackend(files_site(tmp_path / "root"), MemoryReports())
    target = tmp_path / "root" / "link" / "job.sh"
    with pytest.raises(SubmitError) as refused:
        await backend.submit(files_order(inputs=[{"path": str(target), "content": "echo hi"}]))
    assert refused.value.permanent
    assert str(refused.value) == (f"cannot stage the job's inputs: inputs.0.path: {target}: leads outside "
                                  f"{tmp_path / 'root'} through a symlink")
    assert list((tmp_path / "outside").iterdir()) == [] and backend.tracked == {}


@pytest.mark.parametrize(("left", "state", "expected"), [
    (True, "COMPLETED ExitCode=0:0", (0, None)),
    (False, "COMPLETED ExitCode=0:0", (None, ("cannot stage the job's outputs: outputs.0.path: {missing}: "
                                              "No such file or directory"))),
    (False, "FAILED Reason=NonZeroExitCode ExitCode=3:0", (3, "FAILED: NonZeroExitCode")),
])
async def test_outputs_are_copied_when_slurm_says_the_job_ended(tmp_path, left, state, expected):
    result = tmp_path / "w" / "result"
    result.parent.mkdir()
    if left:
        result.write_text("done\n")
    reports = MemoryReports()
    backend = SlurmBackend(files_site(tmp_path), reports)
    order = files_order(outputs=[{"path": str(result), "url": f"file://{tmp_path}/results/result"}])
    backend.tracked["j"] = Tracked(order, "5", datetime.now(UTC), started_at=datetime.now(UTC))
    backend.view = SlurmView(jobs=parse_jobs(f"JobId=5 JobName=continuum-j JobState={state}"))
    await backend.report()
    outcome = await reports.outcome("j")
    assert (outcome.exit_code, outcome.reason) == (expected[0], expected[1] and expected[1].format(missing=result))
    assert (tmp_path / "results" / "result").exists() is left
