"""The Slurm site: jobs run in a real Slurm cluster through its commands (sbatch, scontrol, sinfo, scancel).

Slurm queues and schedules; this backend submits, then follows every job it tracks with one `scontrol`
query per poll (not one per job) and turns Slurm's states into lifecycle reports:

    PENDING                                      dispatched (already reported when sbatch accepted it)
    RUNNING, COMPLETING                          started
    COMPLETED                                    succeeded (exit code 0) or failed (the exit code)
    FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL,
    BOOT_FAIL, DEADLINE                          failed, with Slurm's state as the reason and the exit code
    CANCELLED                                    cancelled
    PREEMPTED, REQUEUED                          requeued (placed again by routing)

Each job carries its Dispatch order (base64 JSON in its Slurm comment, compressed when that is too long for
Slurm: `dispatch_comment`), so a restarted agent finds the jobs its predecessor submitted and follows them on:
a Slurm job outlives its agent. Capacity comes from Slurm too: GPU GRES per node (total and used) and the
partition's whole queue, other users' jobs included. The parsing is pure; the class only runs commands.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import shlex
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from services.agent.backends.base import SITE_ENV, Outcome, Reports, SubmitError, with_outputs
from services.agent.staging import StagingError, stage_in
from shared.contracts.catalog import SiteEntry, SlurmOptions
from shared.contracts.events import utcnow
from shared.contracts.jobs import Dispatch, JobSpec
from shared.contracts.sites import GpuCount, SiteJob

log = structlog.get_logger()

POLL_S = 0.5
# how long an agent that starts waits for Slurm's controller to answer before it reports anything
START_WAIT_S = 30.0
# a job Slurm accepted but no poll has shown for this long is lost
VANISHED_AFTER_S = 60.0
NAME_PREFIX = "continuum-"
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
REQUEUED = {"PREEMPTED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"}
ENDED = FAILED | REQUEUED | {"COMPLETED", "CANCELLED"}


class CommandError(RuntimeError):
    """A Slurm command failed: which one, its exit code and what it said (Slurm's errors go to either
    stream, and a controller that is starting may say nothing at all)."""

    def __init__(self, command: list[str] | tuple[str, ...], code: int, out: str, err: str) -> None:
        said = (err.strip() or out.strip() or "no output")[:500]
        super().__init__(f"{shlex.join(command)} exited {code}: {said}")
        self.code = code


# sbatch's answers that a later try may change: the controller busy, starting, or out of reach
# (Slurm's ESLURM_* and errno texts). Every other refusal is about the job itself, and permanent.
TRANSIENT_REFUSALS = ("temporarily unavailable", "temporarily unable", "try again", "timed out", "time out",
                      "unable to contact slurm controller", "connection refused", "connect failure", "busy",
                      "in standby mode", "transient", "communication")


def is_transient(words: str) -> bool:
    words = words.lower()
    return any(t in words for t in TRANSIENT_REFUSALS)


def refusal_words(said: str) -> str:
    """sbatch's error lines as one: `sbatch: <first>; <second>` (without its repeated `sbatch: error:`)."""
    lines = [line.strip().removeprefix("sbatch:").strip().removeprefix("error:").strip()
             for line in said.splitlines() if line.strip()]
    return ("sbatch: " + "; ".join(lines or ["refused the job without a word"]))[:500]


@dataclass
class SlurmJob:
    """One job as `scontrol -o show job` shows it."""

    slurm_id: str
    name: str
    state: str
    reason: str
    exit_code: int | None
    signal: int
    submitted: datetime | None
    start: datetime | None
    end: datetime | None
    time_limit_s: float | None
    partition: str
    gpus: dict[str, int]  # GRES per node by type, lower case as Slurm has them
    nodes: int
    comment: str

    @property
    def order(self) -> Dispatch | None:
        """The Dispatch a Continuum agent submitted this job for, if it is one of ours."""
        if not self.name.startswith(NAME_PREFIX) or not self.comment:
            return None
        try:
            packed = base64.b64decode(self.comment)
            return Dispatch.model_validate_json(packed if packed.startswith(b"{") else zlib.decompress(packed))
        except (ValueError, zlib.error):
            return None


# Slurm refuses a comment longer than this ("Pathname of a file, directory or other parameter too long")
COMMENT_MAX = 1024


def dispatch_comment(order: Dispatch) -> str:
    """The Slurm comment that carries the order for a restarted agent: base64 JSON, as it always was; when that is
    too long for Slurm, base64 of the zlib-compressed JSON (its defaults left out). Without what is of no use once
    the job is submitted: its inputs (staged already, their content maybe large) and its steps (in the script).
    SubmitError when even that is too long."""
    spec = order.spec
    if spec.inputs or spec.steps:
        order = order.model_copy(update={"spec": spec.model_copy(update={"inputs": [], "steps": []})})
    comment = base64.b64encode(order.model_dump_json().encode()).decode()
    if len(comment) > COMMENT_MAX:
        comment = base64.b64encode(zlib.compress(order.model_dump_json(exclude_defaults=True).encode(), 9)).decode()
    if len(comment) > COMMENT_MAX:
        raise SubmitError(f"the job does not fit Slurm's comment, which carries it for a restarted agent "
                          f"({len(comment)} characters compressed, at most {COMMENT_MAX}): fewer or shorter "
                          f"outputs, or a shorter command", permanent=True)
    return comment


def sbatch_args(order: Dispatch, site: SiteEntry, output: str) -> list[str]:
    """JobSpec to sbatch options. Only what the job asked for goes to Slurm: a resource it leaves unset gets
    the site's default from the catalog, if it gives one, or else Slurm's own (DefMemPerGPU and the like)."""
    spec, r = order.spec, order.spec.resources
    options = site.slurm or SlurmOptions()
    args = ["--parsable", f"--job-name={NAME_PREFIX}{order.job_id}", f"--time={max(1, -(-spec.walltime_s // 60))}",
            f"--output={output}", "--comment=" + dispatch_comment(order),
            f"--export=ALL,CONTINUUM_JOB_ID={order.job_id}",
            "--no-requeue"]  # a job Slurm lets go is requeued by routing, which may place it elsewhere
    if r.nodes > 1:
        args.append(f"--nodes={r.nodes}")
    if r.gpus:
        gres = options.gres_type(order.gpu_type)
        args.append(f"--gres=gpu:{gres}:{r.gpus}" if gres else f"--gres=gpu:{r.gpus}")
    if r.cpus is not None:
        args.append(f"--cpus-per-task={r.cpus}")
    elif options.cpus_per_gpu and r.gpus:
        args.append(f"--cpus-per-gpu={options.cpus_per_gpu}")
    if r.memory_gb is not None:
        args.append(f"--mem={max(1, int(r.memory_gb * 1024))}M")
    elif options.mem_per_gpu_gb and r.gpus:
        args.append(f"--mem-per-gpu={max(1, int(options.mem_per_gpu_gb * 1024))}M")
    for name in ("partition", "account", "qos"):
        if value := getattr(options, name):
            args.append(f"--{name}={value}")
    return args


def batch_script(spec: JobSpec) -> str:
    """The batch script: the job's command; or its steps one after another, each in a subshell with its workdir,
    env (but for what the site sets: SITE_ENV) and redirections, the first that counts and exits non-zero ending
    the script with its exit code (a step with `ignore_error` does not count). Its exit code is the job's."""
    if not spec.steps:
        return "#!/bin/sh\nexec " + shlex.join(spec.command) + "\n"
    lines = ["#!/bin/sh", "# the job's steps, one after another (CONTRACT.md, \"Steps and files\")"]
    for i, step in enumerate(spec.steps):
        inside = [f"export {name}={shlex.quote(value)}" for name, value in step.env.items() if name not in SITE_ENV]
        if step.workdir is not None:
            inside.append(f"cd {shlex.quote(step.workdir)}")
        inside.append("exec " + shlex.join(step.command))
        redirect = "".join(f" {sign} {shlex.quote(path)}" for sign, path in
                           (("<", step.stdin), (">", step.stdout)) if path is not None)
        if step.stderr is not None:
            redirect += " 2>&1" if step.stderr == step.stdout else f" 2> {shlex.quote(step.stderr)}"
        lines.append(f"({' && '.join(inside)}){redirect}")
        lines.append(f"# steps.{i} ignores its error" if step.ignore_error else "rc=$?; [ $rc -eq 0 ] || exit $rc")
    return "\n".join([*lines, "exit 0", ""])


def parse_jobs(text: str) -> dict[str, SlurmJob]:
    """`scontrol -o show job` (one job a line, `Key=value` fields) by Slurm job id."""
    jobs = {}
    for line in text.splitlines():
        fields = _fields(line)
        if "JobId" not in fields:
            continue
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        jobs[fields["JobId"]] = SlurmJob(
            slurm_id=fields["JobId"], name=fields.get("JobName", ""), state=fields.get("JobState", ""),
            reason=fields.get("Reason", "None"), exit_code=int(code) if code.isdigit() else None,
            signal=int(sig) if sig.isdigit() else 0, submitted=_time(fields.get("SubmitTime")),
            start=_time(fields.get("StartTime")),
            end=_time(fields.get("EndTime")), time_limit_s=_duration(fields.get("TimeLimit")),
            partition=fields.get("Partition", ""), gpus=_gres(fields.get("TresPerNode", "")),
            nodes=int(fields.get("NumNodes", "1").split("-")[0] or 1), comment=fields.get("Comment", ""))
    return jobs


def parse_gres(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """(total, used) GPUs by type (lower case) from `sinfo -N -h -O NodeList:|,Gres:|,GresUsed:|,StateLong`
    lines; nodes that are down or drained offer nothing."""
    total: dict[str, int] = {}
    used: dict[str, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 4 or any(s in parts[3] for s in ("down", "drain", "fail")):
            continue
        for t, n in _gres(parts[1]).items():
            total[t] = total.get(t, 0) + n
        for t, n in _gres(parts[2]).items():
            used[t] = used.get(t, 0) + n
    return total, used


def outcome_of(job: SlurmJob) -> Outcome:
    """How an ended Slurm job went, as a lifecycle outcome."""
    if job.state == "COMPLETED":
        return Outcome(job.exit_code if job.exit_code is not None else 0)
    if job.state == "CANCELLED":
        return Outcome(None, "CANCELLED", cancelled=True)
    if job.state in REQUEUED:
        return Outcome(None, f"{job.state} by Slurm", requeue=True)
    exit_code = job.exit_code if job.exit_code else None
    detail = f" (signal {job.signal})" if job.signal else ""
    return Outcome(exit_code, f"{job.state}: {job.reason}{detail}" if job.reason not in ("None", "") else
                   job.state + detail)


def _fields(line: str) -> dict[str, str]:
    fields = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def _gres(text: str) -> dict[str, int]:
    """`gres:gpu:h100:3`, `gpu:h100:8`, `gpu:h100:6(IDX:0-5)`, several comma-separated: GPUs by type ("" for
    untyped `gpu:8`)."""
    out: dict[str, int] = {}
    for item in text.split(","):
        parts = item.split("(")[0].split(":")
        if parts and parts[0] == "gres":
            parts = parts[1:]
        if len(parts) >= 3 and parts[0] == "gpu" and parts[2].isdigit():
            out[parts[1].lower()] = out.get(parts[1].lower(), 0) + int(parts[2])
        elif len(parts) == 2 and parts[0] == "gpu" and parts[1].isdigit():  # untyped GRES
            out[""] = out.get("", 0) + int(parts[1])
    return out


def _time(text: str | None) -> datetime | None:
    if not text or text in ("Unknown", "None", "N/A"):
        return None
    return datetime.fromisoformat(text).astimezone(UTC)  # Slurm writes the local time, without a zone


def _duration(text: str | None) -> float | None:
    """`[days-]hours:minutes:seconds`, `minutes:seconds`; None for UNLIMITED."""
    if not text or not text[0].isdigit():
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days or 0) * 24 + parts[0]) * 3600 + parts[1] * 60 + parts[2]


@dataclass
class Tracked:
    order: Dispatch
    slurm_id: str
    arrived: datetime
    started_at: datetime | None = None
    stop_reason: str | None = None
    superseded: bool = False
    seen: bool = False  # in a poll's answer at least once


@dataclass
class SlurmView:
    """The last poll: Continuum's jobs as Slurm has them, the partition's other jobs, and GPUs."""

    jobs: dict[str, SlurmJob] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    taken_at: datetime | None = None  # when the poll began


class SlurmBackend:
    """Runs dispatched jobs in Slurm: a `base.SiteBackend`, as the slot backends are."""

    def __init__(self, site: SiteEntry, reports: Reports, poll_s: float = POLL_S) -> None:
        self.site = site
        self.reports = reports
        self.poll_s = poll_s
        self.partition = site.slurm.partition if site.slurm else None
        self.tracked: dict[str, Tracked] = {}
        self.view = SlurmView()
        self.waited_total = 0
        self.output_dir = "/tmp"
        self._poller: asyncio.Task | None = None
        self._answered = False  # Slurm has answered a poll since this agent started
        # each catalog GPU type by the GRES type Slurm counts it as (lower case, as parsed), and back
        options = site.slurm or SlurmOptions()
        self._gres = {t: options.gres_type(t).lower() for t in site.gpus}
        self._types = {g: t for t, g in self._gres.items()}

    # the surface the agent uses
    @property
    def known(self) -> set[str]:
        return set(self.tracked)

    @property
    def queue(self) -> list[Dispatch]:
        return [t.order for t in self.tracked.values() if t.started_at is None]

    @property
    def running(self) -> dict[str, Tracked]:
        return {j: t for j, t in self.tracked.items() if t.started_at is not None}

    def queued(self) -> int:
        """Every job waiting in the partition, other users' too: what saturates the site."""
        return sum(1 for j in self._partition_jobs() if j.state == "PENDING")

    async def submit(self, order: Dispatch) -> bool:
        if order.job_id in self.tracked:
            return False
        output = f"{self.output_dir}/continuum-{order.job_id}-{order.attempt}.out"
        args = sbatch_args(order, self.site, output)  # first: it may refuse the job, before anything is staged
        await self._stage_in(order.spec)
        self._ensure_polling()
        code, out, err = await _run("sbatch", *args, stdin=batch_script(order.spec))
        if code != 0:
            words = refusal_words(err or out)
            raise SubmitError(words, permanent=not is_transient(words))
        slurm_id = out.strip().split(";")[0]
        self.tracked[order.job_id] = Tracked(order, slurm_id, utcnow())
        log.info("slurm.submitted", job_id=order.job_id, slurm_id=slurm_id, site=self.site.id)
        return True

    async def _stage_in(self, spec: JobSpec) -> None:
        """The job's inputs, workdirs and the directories its redirections go to, made by the agent before the job
        is submitted, beneath the site's files_root on the filesystem its nodes share. One that cannot be is the
        site's refusal, for good: routing tries another site, or fails the job with these words."""
        if not spec.staged_paths():
            return
        root = self.site.files_root
        if root is None or (why := self.site.cannot_stage(spec)):  # the agent refuses such a job before this
            raise SubmitError(f"cannot stage the job's files: {why or 'the site has no files_root'}", permanent=True)
        try:
            await asyncio.to_thread(stage_in, spec, root)
        except StagingError as e:
            raise SubmitError(f"cannot stage the job's inputs: {e}", permanent=True) from None

    async def cancel(self, job_id: str, reason: str, superseded: bool = False, attempt: int | None = None) -> bool:
        tracked = self.tracked.get(job_id)
        if tracked is None or attempt not in (None, tracked.order.attempt):
            return False
        tracked.stop_reason, tracked.superseded = reason, superseded
        code, _, err = await _run("scancel", tracked.slurm_id)
        if code != 0:
            log.warning("slurm.scancel_failed", job_id=job_id, slurm_id=tracked.slurm_id, error=err.strip())
        return True

    def capacity(self) -> dict[str, GpuCount]:
        counts: dict[str, GpuCount] = {}
        for t, n in self.site.gpus.items():
            gres = self._gres[t]
            total = self.view.total.get(gres, n) if self.view.total else n
            free = max(0, total - self.view.used.get(gres, 0))
            wanted = sum(j.gpus.get(gres, 0) * j.nodes for j in self._partition_jobs() if j.state == "PENDING")
            counts[t] = GpuCount(total=total, free=free, reserved=wanted)
        return counts

    def jobs(self) -> list[SiteJob]:
        """The partition's queue in Slurm's order (pending first, by id), then what runs: other users' jobs
        too, since they hold the GPUs and the queue that Continuum's jobs wait behind."""
        out = []
        for job in sorted(self._partition_jobs(), key=lambda j: (j.state != "PENDING", int(j.slurm_id.split("_")[0]))):
            order = job.order
            gpu_type, gpus = next(iter(job.gpus.items()), ("none", 0))
            tracked = self.tracked.get(order.job_id) if order else None
            out.append(SiteJob(
                job_id=order.job_id if order else f"slurm-{job.slurm_id}", attempt=order.attempt if order else 0,
                gpu_type=self._types.get(gpu_type, gpu_type.upper()), gpus=gpus * job.nodes,
                walltime_s=job.time_limit_s or 0.0,
                queued_at=tracked.arrived if tracked else (job.submitted or job.start or utcnow()),
                started_at=job.start if job.state in RUNNING else None))
        return out

    async def close(self) -> None:
        """Stop following the jobs; they run on in Slurm, and the next agent picks them up again."""
        if self._poller:
            self._poller.cancel()

    # following Slurm
    def _partition_jobs(self) -> list[SlurmJob]:
        return [j for j in self.view.jobs.values() if j.state == "PENDING" or j.state in RUNNING
                if self.partition in (None, j.partition)]

    def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            # from an empty context: not that of the job whose submission started it
            self._poller = asyncio.create_task(self._follow(), name=f"slurm-{self.site.id}",
                                               context=contextvars.Context())

    async def start(self) -> None:
        """Follow Slurm, and take back the jobs a previous agent submitted. A controller that is still
        starting is waited for quietly, a while, before the agent reports anything."""
        deadline = asyncio.get_running_loop().time() + START_WAIT_S
        while not self._answered and asyncio.get_running_loop().time() < deadline:
            await self._poll_once()
            if not self._answered:
                await asyncio.sleep(self.poll_s)
        self._ensure_polling()

    def _take_back(self) -> None:
        for job in self.view.jobs.values():
            order = job.order
            if order and order.site == self.site.id and order.job_id not in self.tracked and job.state not in ENDED:
                self.tracked[order.job_id] = Tracked(order, job.slurm_id, job.start or utcnow(),
                                                     started_at=job.start if job.state in RUNNING else None)
                log.info("slurm.reattached", job_id=order.job_id, slurm_id=job.slurm_id, state=job.state)

    async def _follow(self) -> None:
        while True:
            if await self._poll_once():
                try:
                    await self.report()
                except Exception:
                    log.exception("slurm.report_failed", site=self.site.id)
            await asyncio.sleep(self.poll_s)

    async def _poll_once(self) -> bool:
        """One poll; False if Slurm did not answer (said quietly until it first has: its controller starts)."""
        try:
            await self.poll()
        except CommandError as e:
            if self._answered:
                log.warning("slurm.poll_failed", site=self.site.id, error=str(e))
            else:
                log.info("slurm.waiting_for_controller", site=self.site.id, error=str(e))
            return False
        except Exception:  # a command missing, output we cannot read: loud, and tried again
            log.exception("slurm.poll_failed", site=self.site.id)
            return False
        if not self._answered:
            self._answered = True
            self._take_back()
        return True

    async def poll(self) -> None:
        """Two commands for everything: every job Slurm knows, and every node's GPUs."""
        taken_at = utcnow()
        command = ("scontrol", "-o", "show", "job")
        code, out, err = await _run(*command)
        if code != 0 and "No jobs in the system" not in out + err:
            raise CommandError(command, code, out, err)
        jobs = parse_jobs(out)
        command = ("sinfo", "-N", "-h", "-O", "NodeList:|,Gres:|,GresUsed:|,StateLong",
                   *(("-p", self.partition) if self.partition else ()))
        code, out, err = await _run(*command)
        if code != 0:
            raise CommandError(command, code, out, err)
        total, used = parse_gres(out)
        self.view = SlurmView(jobs, total, used, taken_at)

    async def report(self) -> None:
        by_slurm_id = {t.slurm_id: t for t in self.tracked.values()}
        for slurm_id, tracked in list(by_slurm_id.items()):
            job = self.view.jobs.get(slurm_id)
            order = tracked.order
            if job is None:
                # submitted after the poll began, or Slurm forgot it (purged, or its controller lost its state)
                taken_at = self.view.taken_at
                if tracked.seen or (taken_at and (taken_at - tracked.arrived).total_seconds() > VANISHED_AFTER_S):
                    await self._end(tracked, Outcome(None, "the job vanished from Slurm"))
                continue
            tracked.seen = True
            if tracked.started_at is None and (job.state in RUNNING or (job.state in ENDED and job.start)):
                tracked.started_at = job.start or utcnow()
                if not tracked.superseded:
                    await self.reports.started(order, tracked.started_at)
            if job.state in ENDED:
                outcome = outcome_of(job)
                if outcome.cancelled and tracked.stop_reason:
                    outcome = Outcome(None, tracked.stop_reason, cancelled=True)
                await self._end(tracked, outcome, job.end)

    async def _end(self, tracked: Tracked, outcome: Outcome, at: datetime | None = None) -> None:
        self.tracked.pop(tracked.order.job_id, None)
        if tracked.superseded:
            self.reports.left(tracked.order, at or utcnow(), "superseded")
            return
        if tracked.order.spec.outputs and self.site.files_root and outcome.exit_code is not None:
            outcome = await with_outputs(tracked.order, self.site.files_root, outcome)
        await self.reports.ended(tracked.order, tracked.started_at, at or utcnow(), outcome)


async def _run(*command: str, stdin: str | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate(stdin.encode() if stdin is not None else None)
    assert process.returncode is not None  # communicate() waited for it to exit
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
