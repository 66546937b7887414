"""services/agent/backends/slurm.py: sbatch options, and reading scontrol and sinfo, on real output lines."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from services.agent.backends.slurm import (
    CommandError,
    is_transient,
    outcome_of,
    parse_gres,
    parse_jobs,
    refusal_words,
    sbatch_args,
)
from shared.contracts.catalog import SiteEntry, SlurmOptions
from shared.contracts.jobs import Dispatch, JobSpec

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
