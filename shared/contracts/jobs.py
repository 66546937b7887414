r"""Jobs: the spec a submitter sends, the record the registry keeps, the commands between services.

The job state machine (CONTRACT.md). Each arrow is a job event `continuum.events.job.<tenant>.<job_id>.<kind>`:

    (submit) --> rejected                                        terminal
    (submit) --> accepted --> [queued] --> placed --> dispatched --> started --> succeeded   terminal
                                   ^                                        \--> failed      terminal
                                   |                                         \-> cancelled   terminal
                                   +-- requeued <-- (site refused, lost or preempted the job)

    (cancel at a working site) --> cancelling --> cancelled (or succeeded, failed: whichever the site reports)

A job ends in exactly one of rejected, succeeded, failed, cancelled; once it has, later events are kept in
its history but never change its state. `cancelled` and `failed` may come from any non-terminal state.
"""

from __future__ import annotations

import posixpath
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    field_serializer,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.contracts.events import CloudEvent

TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
TenantId = Annotated[str, StringConstraints(pattern=TENANT_PATTERN)]
LabelKey = Annotated[str, StringConstraints(max_length=128)]
LabelValue = Annotated[str, StringConstraints(max_length=1024)]
GpuType = Literal["H100", "A100", "L40S", "L4"]
GPU_TYPES: tuple[str, ...] = ("H100", "A100", "L40S", "L4")
# argv: what JobSpec.command and each of its steps run
Command = Annotated[list[Annotated[str, StringConstraints(max_length=4096)]], Field(min_length=1, max_length=1024)]


class JobState(StrEnum):
    accepted = "accepted"
    rejected = "rejected"
    queued = "queued"
    placed = "placed"
    dispatched = "dispatched"
    started = "started"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    requeued = "requeued"
    # asked to stop at its site: the job stays so until the site says it ended (an addition to v1's kinds)
    cancelling = "cancelling"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.rejected, JobState.succeeded, JobState.failed, JobState.cancelled})


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(1, ge=0, le=4096)
    gpu_type: GpuType | Literal["any"] = "any"
    # CPUs a task and memory a node: None when the job does not say, so that a site applies its own defaults
    # (Slurm's DefMemPerGPU, say) rather than one of ours that its nodes may not have
    cpus: int | None = Field(None, ge=1, le=100_000)
    memory_gb: float | None = Field(None, gt=0, le=1_000_000)
    nodes: int = Field(1, ge=1, le=10_000)

    @property
    def total_gpus(self) -> int:
        """GPUs are asked per node, as Slurm's --gres is."""
        return self.gpus * self.nodes


# Steps and files (CONTRACT.md, "Steps and files"): the paths a job names are absolute, kept normalised, and
# never climb (`..`), so that whether one lies beneath a site's `files_root` is a comparison of strings (the
# policy's); the agent checks again, on the filesystem, when it stages them. The only URLs are file:// ones: a
# path on the site's own filesystem.
PATH_MAX = 4096


def _absolute_path(path: str) -> str:
    if not path.startswith("/"):
        raise PydanticCustomError("absolute_path", "must be an absolute path")
    if "\0" in path:
        raise PydanticCustomError("absolute_path", "must not contain a NUL character")
    if ".." in path.split("/"):
        raise PydanticCustomError("absolute_path", "must not contain '..'")
    return "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading `//`


AbsolutePath = Annotated[str, StringConstraints(min_length=1, max_length=PATH_MAX), AfterValidator(_absolute_path)]


def file_url_path(url: str) -> str:
    """The path a file:// URL names on the site (percent-decoded, normalised); PydanticCustomError if it is not
    one this contract accepts."""
    if url[:7].lower() != "file://":
        raise PydanticCustomError("file_url", "only file:// URLs are supported")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise PydanticCustomError("file_url", "a file:// URL names a path on the site: file:///absolute/path")
    try:
        return _absolute_path(unquote(parts.path))
    except PydanticCustomError as e:
        raise PydanticCustomError("file_url", "the path of a file:// URL {problem}", {"problem": e.message()}) from None


def _file_url(url: str) -> str:
    file_url_path(url)
    return url


FileUrl = Annotated[str, StringConstraints(min_length=1, max_length=3 * PATH_MAX), AfterValidator(_file_url)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
EnvValue = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=32_768)]


class Step(BaseModel):
    """One of the commands a job runs one after another (a TES executor). A step that exits non-zero ends the job
    with its exit code, unless it has `ignore_error`; the job's exit code is that of the last step that counts."""

    model_config = ConfigDict(extra="forbid")

    command: Command
    image: str | None = Field(None, max_length=1024)  # for sites that run containers; local and Slurm ignore it
    workdir: AbsolutePath | None = None
    stdin: AbsolutePath | None = None  # a file the step reads as its standard input
    stdout: AbsolutePath | None = None  # files its standard output and error are written to (replaced)
    stderr: AbsolutePath | None = None
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=128)  # added to the job's environment
    ignore_error: bool = False


class FileInput(BaseModel):
    """A file put at `path` before the first step: `content` written there, or a copy of the file at `url`."""

    model_config = ConfigDict(extra="forbid")

    path: AbsolutePath
    content: str | None = Field(None, max_length=1_048_576)
    url: FileUrl | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FileInput:
        if (self.content is None) == (self.url is None):
            raise PydanticCustomError("file_input", "needs exactly one of content or url")
        return self


class FileOutput(BaseModel):
    """A file the job leaves at `path`, copied to `url` after its last step."""

    model_config = ConfigDict(extra="forbid")

    path: AbsolutePath
    url: FileUrl


def _empty(value: list) -> bool:
    return not value


class JobSpec(BaseModel):
    """What a submitter asks for (CONTRACT.md, JobSpec v1)."""

    model_config = ConfigDict(extra="forbid")

    tenant: TenantId
    name: str = Field("", max_length=256)
    command: Command
    image: str | None = Field(None, max_length=1024)
    resources: Resources = Field(default_factory=Resources)
    walltime_s: int = Field(3600, ge=1, le=2_592_000)
    # None means "the tenant's default residency" (the catalog's, which is EU unless it says otherwise);
    # intake resolves it, so every accepted job carries a concrete one.
    residency: Annotated[str, StringConstraints(pattern=r"^(EU|any|[A-Z]{2})$")] | None = None
    certifications: list[Annotated[str, StringConstraints(max_length=64)]] = Field(default_factory=list, max_length=32)
    overflow: Literal["allowed", "forbidden"] = "allowed"
    objective: Literal["balanced", "time", "cost", "carbon"] = "balanced"
    priority: int = Field(4, ge=0, le=9)
    deadline: AwareDatetime | None = None
    budget_eur: float | None = Field(None, ge=0)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)
    # Steps and files (CONTRACT.md): with `steps`, they are what runs, the first being `command` (the job's
    # headline). Left out of the JSON when empty, so that a job without them reads as it always did (an agent
    # of an earlier version, which forbids unknown fields, still takes it).
    steps: list[Step] = Field(default_factory=list, max_length=32, exclude_if=_empty)
    inputs: list[FileInput] = Field(default_factory=list, max_length=256, exclude_if=_empty)
    outputs: list[FileOutput] = Field(default_factory=list, max_length=256, exclude_if=_empty)

    @model_validator(mode="after")
    def _steps_begin_with_the_command(self) -> JobSpec:
        if self.steps and self.steps[0].command != self.command:
            detail = InitErrorDetails(type=PydanticCustomError("steps_command", "must be the job's command"),
                                      loc=("steps", 0, "command"), input=self.steps[0].command)
            raise ValidationError.from_exception_data(type(self).__name__, [detail])
        return self

    def staged_paths(self) -> list[tuple[str, str, str]]:
        """Every path a site touches for the job, as (the item that names it, its field, the path): `("inputs.0",
        "url", "/srv/in.txt")`. Empty for a job without steps and files."""
        paths: list[tuple[str, str, str]] = []
        files: list[tuple[str, FileInput | FileOutput]] = [
            *((f"inputs.{i}", f) for i, f in enumerate(self.inputs)),
            *((f"outputs.{i}", f) for i, f in enumerate(self.outputs))]
        for item, f in files:
            paths.append((item, "path", f.path))
            if f.url is not None:
                paths.append((item, "url", file_url_path(f.url)))
        for i, step in enumerate(self.steps):
            for name in ("workdir", "stdin", "stdout", "stderr"):
                if (path := getattr(step, name)) is not None:
                    paths.append((f"steps.{i}", name, path))
        return paths


def beneath(path: str, root: str) -> bool:
    """Whether a normalised absolute path is `root` or lies under it (as strings: neither may hold `..`)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class SubmitReply(BaseModel):
    job_id: str
    state: Literal["accepted", "rejected"]
    errors: list[FieldError] = Field(default_factory=list)


class JobRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class HistoryRequest(BaseModel):
    """A page of job and billing events from the event stream, after a stream sequence (0: from the start). A
    tenant's requests read its own only; the operator's, one tenant's or (without `tenant`) every event."""

    model_config = ConfigDict(extra="forbid")

    after_seq: int = Field(0, ge=0)
    limit: int = Field(500, ge=1, le=1000)
    tenant: TenantId | None = None


class HistoryReply(BaseModel):
    # each {"seq": the event's stream sequence, "subject", "event": the CloudEvent}, in stream order
    events: list[dict[str, Any]]
    # the stream's last sequence when read: a reader is caught up once it has read up to it
    last_seq: int


class CancelRequest(JobRef):
    reason: str = Field("cancelled by the user", max_length=1024)


class CancelReply(BaseModel):
    job_id: str
    # the state after the request: `cancelled` when done at once, `cancelling` while the site stops the job,
    # or the terminal state the job had already reached
    state: str


class Candidate(BaseModel):
    """A catalog site as the policy saw it for the job. Its reasons are of one of three kinds: none, and it is
    `eligible` (it could take the job now); with `holds`, it could run the job some day and waits on what they
    name; without, it never can (a job every site never can is rejected)."""

    site: str
    eligible: bool
    reasons: list[str] = Field(default_factory=list)
    # what keeps a site that could run the job some day from taking it now: gpus (not enough free, or the site
    # saturated), gate (public capacity first), budget, share (the overflow share is taken), down, avoid (it gave
    # the job back a moment ago), line (a waiting job of higher priority goes first), greener (a greener hour)
    holds: list[str] = Field(default_factory=list)
    score: float | None = None
    parts: dict[str, float] = Field(default_factory=dict)


class Decision(BaseModel):
    """Why a job goes where it goes (or waits): one candidate for every catalog site."""

    site: str | None
    gpu_type: str | None = None
    overflow: bool = False
    candidates: list[Candidate]
    # set when no site could ever run the job: it is rejected instead of waiting forever
    impossible: bool = False
    # set when the job waits for a greener hour at its chosen site (its objective is carbon, its deadline leaves
    # slack): it is placed again then
    wait_until: datetime | None = None
    @property
    def holds(self) -> dict[str, frozenset[str]]:
        """For a job that waits: each site that could run it some day, and what keeps it from taking the job."""
        return {c.site: frozenset(c.holds) for c in self.candidates if c.holds}

    @property
    def reasons(self) -> list[str]:
        return [f"{c.site}: {r}" for c in self.candidates for r in c.reasons]


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    state: JobState
    time: datetime
    event_id: str
    seq: int = 0


class JobRecord(BaseModel):
    """The registry's view of one job (CONTRACT.md, JobRecord), built from its events."""

    job_id: str
    tenant: str
    state: JobState
    site: str | None = None
    spec: JobSpec | None = None
    decision: Decision | None = None
    history: list[HistoryEntry] = Field(default_factory=list)
    exit_code: int | None = None
    reasons: list[str] = Field(default_factory=list)
    attempt: int = 0
    traceparent: str | None = None
    # the stream sequence of the event the decision came from: a late, older event never replaces it
    decision_seq: int = -1


class Dispatch(BaseModel):
    """routing -> agent: run this job on your site (JetStream, `continuum.dispatch.<site>.run`)."""

    job_id: str
    tenant: str
    site: str
    gpu_type: str
    attempt: int
    spec: JobSpec


class StopJob(BaseModel):
    """intake -> agent: stop this job (JetStream, `continuum.dispatch.<site>.cancel`).

    routing sends it with `superseded` for a job it moved elsewhere while the site was down: the agent stops
    that run quietly (no event: the job lives on at another site) and does nothing if it does not have it."""

    job_id: str
    reason: str
    superseded: bool = False
    # the placement attempt to stop (None: whichever the site has): a late stop never hits a newer attempt
    attempt: int | None = None


class JobEventData(BaseModel):
    """The `data` of a job event (CONTRACT.md, Events and "Job event data"): job_id, tenant and state always,
    and what the step that made it has to say:

    - intake: accepted, spec and traceparent; rejected, errors and reason; cancelled, reason (and site)
    - routing: placed, site, gpu_type, overflow, reservation and decision; queued, decision and reasons;
      rejected or failed, reasons and reason (and decision); requeued off a site that went down, site, reason
    - a site's agent: site, gpu_type and gpus (all the job's GPUs) on a run's events; started_at on started
      and, if it started, on its end; ended_at, exit_code and reason on its end; requeued, reason and, if the
      site refused the job, refusal
    - every step of a placement carries its attempt; intake's events carry none (read as 0)

    In the JSON a field is there only if its producer gave it, and gave it a value: none is ever `null` (a
    job that never started has no `started_at`), and `attempt` is absent from an event that names none (the
    registry tells those apart: `gives`). Keys this code does not know (a newer producer's) are kept, so
    that routing passes a site's report on whole."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    tenant: str
    state: JobState
    site: str | None = None
    attempt: int = 0
    spec: JobSpec | None = None
    traceparent: str | None = None
    errors: list[FieldError] | None = None
    decision: Decision | None = None
    reasons: list[str] = Field(default_factory=list)
    reason: str | None = None
    gpu_type: str | None = None
    overflow: bool = False
    reservation: str | None = None
    gpus: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    refusal: Literal["permanent", "transient"] | None = None

    def gives(self, field: str) -> bool:
        """Whether the event carries this field (with a value): `attempt` and `reasons` read 0 and [] either way."""
        return field in self.model_fields_set and getattr(self, field, None) is not None

    @field_serializer("started_at", "ended_at", when_used="json-unless-none")
    def _as_the_agent_writes_it(self, at: datetime) -> str:
        # as isoformat() writes it (an offset, +00:00, where the envelope's time has Z), as it always was
        return at.isoformat()

    @model_serializer(mode="wrap")
    def _what_was_given(self, handler: SerializerFunctionWrapHandler):  # unannotated: the schema keeps the fields
        given = self.model_fields_set
        return {k: v for k, v in handler(self).items() if v is not None and k in given}


class JobEvent(CloudEvent[JobEventData]):
    """An event on `continuum.events.job.<tenant>.<job_id>.<kind>`: its kind is the state the job entered."""

    @classmethod
    def of(cls, service: str, data: JobEventData, *id_parts: object, time: datetime | None = None) -> JobEvent:
        """The event `data` tells of: its kind the state the job entered, its subject the job; its id from the
        job, the kind and `id_parts` (the attempt, for most), so that a step redone is the same event."""
        return cls.make(service, "job", data.state.value, data.job_id, data, data.job_id, *id_parts, time=time)
