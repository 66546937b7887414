"""GA4GH TES 1.1 on Continuum's contract (CONTRACT.md, v2 "HTTP"), pure: a TES task in, a JobSpec out; a
JobRecord in, a TES task out, in the view asked for.

The mapping is the contract's. The first executor's image and command are the job's; with more than one
executor, or one that sets what a job's command cannot (workdir, stdin, stdout, stderr, env, ignore_error),
they are the job's `steps`. Placement goes in `resources.backend_parameters` (keys case-insensitive), which
`service-info` lists. TES `tags` are the job's `labels` both ways; the task's `description` rides in a label of
ours that the tags leave out. What a site cannot do is refused at creation, naming the TES field: an input URL
other than `file://` (or a plain absolute path), a directory, an output with wildcards, volumes.

Responses carry no field that TES does not define (strict clients, py-tes among them, refuse unknown ones):
Continuum's own say (its state, site, why a job waits) goes in `logs[].metadata` and `logs[].system_logs`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.contracts.jobs import JobSpec, JobState

# the tag (and label) an open API's request names its tenant by
TENANT_TAG = "continuum.tenant"
# the task's description, kept in the job's labels, out of its tags
DESCRIPTION_LABEL = "continuum.tes.description"

NO_VOLUMES = "not supported: a job's executors share its site's file system (use paths under its files root)"

# backend_parameters -> where they go in a JobSpec, and what a string value becomes
BACKEND_PARAMETERS: dict[str, tuple[tuple[str, ...], Any]] = {
    "gpus": (("resources", "gpus"), int),
    "gpu_type": (("resources", "gpu_type"), str),
    "nodes": (("resources", "nodes"), int),
    "walltime_s": (("walltime_s",), int),
    "residency": (("residency",), str),
    "certifications": (("certifications",), lambda v: [c.strip() for c in v.split(",") if c.strip()]),
    "objective": (("objective",), str),
    "overflow": (("overflow",), str),
    "priority": (("priority",), int),
    "deadline": (("deadline",), str),
    "budget_eur": (("budget_eur",), float),
}


class TesState(StrEnum):
    UNKNOWN = "UNKNOWN"
    QUEUED = "QUEUED"
    INITIALIZING = "INITIALIZING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETE = "COMPLETE"
    EXECUTOR_ERROR = "EXECUTOR_ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    CANCELED = "CANCELED"
    PREEMPTED = "PREEMPTED"
    CANCELING = "CANCELING"


View = Literal["MINIMAL", "BASIC", "FULL"]

_STATES: dict[JobState, TesState] = {
    JobState.accepted: TesState.QUEUED, JobState.queued: TesState.QUEUED, JobState.placed: TesState.QUEUED,
    JobState.requeued: TesState.QUEUED, JobState.dispatched: TesState.INITIALIZING,
    JobState.started: TesState.RUNNING, JobState.succeeded: TesState.COMPLETE,
    JobState.cancelling: TesState.CANCELING, JobState.cancelled: TesState.CANCELED,
    # refused by routing after intake took it (no site can ever run it): the system's answer, not the command's
    JobState.rejected: TesState.SYSTEM_ERROR,
}


def tes_state(state: str, exit_code: int | None) -> TesState:
    if state == JobState.failed:
        # the job's command failed (it has an exit code), or the system failed it (walltime, a lost site...)
        return TesState.EXECUTOR_ERROR if exit_code not in (None, 0) else TesState.SYSTEM_ERROR
    return _STATES.get(JobState(state), TesState.UNKNOWN)


def job_states(state: TesState) -> list[str]:
    """The job states a TES state filter matches (failed is split by exit code afterwards)."""
    if state in (TesState.EXECUTOR_ERROR, TesState.SYSTEM_ERROR):
        return [JobState.failed.value, *([JobState.rejected.value] if state == TesState.SYSTEM_ERROR else [])]
    return [s.value for s, t in _STATES.items() if t == state]


# --- what a client sends (readOnly fields it echoes back are taken and ignored) -----------------------------

class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TesExecutor(_Lenient):
    image: str = Field(max_length=1024)
    command: list[str] = Field(min_length=1, max_length=1024)
    workdir: str | None = None
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    env: dict[str, str] | None = None
    ignore_error: bool | None = None


class TesInput(_Lenient):
    name: str | None = None
    description: str | None = None
    url: str | None = None
    path: str
    type: Literal["FILE", "DIRECTORY"] = "FILE"
    content: str | None = None
    streamable: bool | None = None


class TesOutput(_Lenient):
    name: str | None = None
    description: str | None = None
    url: str
    path: str
    path_prefix: str | None = None
    type: Literal["FILE", "DIRECTORY"] = "FILE"


class TesResources(_Lenient):
    cpu_cores: int | None = None
    preemptible: bool | None = None
    ram_gb: float | None = None
    disk_gb: float | None = None
    zones: list[str] | None = None
    backend_parameters: dict[str, str] | None = None
    backend_parameters_strict: bool | None = None


class TesTask(_Lenient):
    name: str | None = None
    description: str | None = None
    inputs: list[TesInput] | None = None
    outputs: list[TesOutput] | None = None
    resources: TesResources | None = None
    executors: list[TesExecutor] = Field(min_length=1, max_length=32)
    volumes: list[str] | None = None
    tags: dict[str, str] | None = None


class TesError(ValueError):
    """A task Continuum cannot take, and where in it the problem is (a 400 names them)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{where}: {what}" for where, what in problems))


# --- TES -> JobSpec ---------------------------------------------------------------------------------------

def to_job_spec(task: TesTask, tenant: str | None) -> dict:
    """The JobSpec (as JSON) of a TES task, for `tenant` (None: the task's `continuum.tenant` tag names it).
    Raises TesError naming the TES fields it cannot take; the JobSpec is validated here, so that its errors
    name TES fields too."""
    problems: list[tuple[str, str]] = []
    tags = dict(task.tags or {})
    first = task.executors[0]
    spec: dict[str, Any] = {"tenant": tenant or tags.get(TENANT_TAG), "name": task.name or "",
                            "command": first.command, "image": first.image or None, "labels": tags}
    if spec["tenant"] is None:
        problems.append((f"tags.{TENANT_TAG}", "name the tenant the task runs for (or send a tenant's token)"))
    if task.description:
        spec["labels"] = {**tags, DESCRIPTION_LABEL: task.description}
    if len(task.executors) > 1 or _needs_steps(first):
        spec["steps"] = [_step(e) for e in task.executors]
    if task.inputs:
        spec["inputs"] = [_input(i, n, problems) for n, i in enumerate(task.inputs)]
    if task.outputs:
        spec["outputs"] = [_output(o, n, problems) for n, o in enumerate(task.outputs)]
    if task.volumes:
        problems.append(("volumes", NO_VOLUMES))
    _resources(task.resources or TesResources(), spec, problems)
    if problems:
        raise TesError(problems)
    try:
        return JobSpec.model_validate(spec).model_dump(mode="json", exclude_unset=True)
    except ValidationError as e:
        raise TesError([(tes_field(err["loc"]), err["msg"]) for err in e.errors()]) from None


def _needs_steps(executor: TesExecutor) -> bool:
    return any((executor.workdir, executor.stdin, executor.stdout, executor.stderr, executor.env,
                executor.ignore_error))


def _step(executor: TesExecutor) -> dict:
    step = {"command": executor.command, "image": executor.image or None, "workdir": executor.workdir,
            "stdin": executor.stdin, "stdout": executor.stdout, "stderr": executor.stderr,
            "env": executor.env or {}, "ignore_error": bool(executor.ignore_error)}
    return {k: v for k, v in step.items() if v not in (None, {})}


def _file_url(url: str) -> str:
    """TES allows a plain absolute path for a URL: it is a file:// one."""
    return f"file://{url}" if url.startswith("/") else url


def _input(item: TesInput, n: int, problems: list[tuple[str, str]]) -> dict:
    if item.type == "DIRECTORY":
        problems.append((f"inputs.{n}.type", "directories are not supported: list the files"))
    if item.content is not None:  # TES: content wins over a url
        return {"path": item.path, "content": item.content}
    if not item.url:
        problems.append((f"inputs.{n}.url", "give a url or a content"))
        return {"path": item.path}
    return {"path": item.path, "url": _file_url(item.url)}


def _output(item: TesOutput, n: int, problems: list[tuple[str, str]]) -> dict:
    if item.type == "DIRECTORY" or any(c in item.path for c in "*?["):
        problems.append((f"outputs.{n}.path", "directories and wildcards are not supported: list the files"))
    return {"path": item.path, "url": _file_url(item.url)}


def _resources(resources: TesResources, spec: dict, problems: list[tuple[str, str]]) -> None:
    wanted: dict[str, Any] = {}
    if resources.cpu_cores is not None:
        wanted["cpus"] = resources.cpu_cores
    if resources.ram_gb is not None:
        wanted["memory_gb"] = resources.ram_gb
    for raw_key, value in (resources.backend_parameters or {}).items():
        key = raw_key.lower()
        if key not in BACKEND_PARAMETERS:
            if resources.backend_parameters_strict:
                problems.append((f"resources.backend_parameters.{raw_key}",
                                 f"not supported; supported: {', '.join(BACKEND_PARAMETERS)}"))
            continue  # TES: a backend neither keeps nor returns a key it does not support
        path, convert = BACKEND_PARAMETERS[key]
        try:
            converted = convert(value)
        except ValueError:
            problems.append((f"resources.backend_parameters.{raw_key}", f"not a valid value: {value!r}"))
            continue
        if path[0] == "resources":
            wanted[path[1]] = converted
        else:
            spec[path[0]] = converted
    if wanted:
        spec["resources"] = wanted


def tes_field(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """Where a JobSpec problem is, as a TES client named it."""
    parts = [str(p) for p in loc]
    if not parts:
        return "body"
    head, rest = parts[0], parts[1:]
    if head == "resources" and rest:
        named = {"cpus": "resources.cpu_cores", "memory_gb": "resources.ram_gb"}
        return named.get(rest[0], f"resources.backend_parameters.{rest[0]}")
    if head in BACKEND_PARAMETERS:
        return f"resources.backend_parameters.{head}"
    if head == "command":
        return ".".join(["executors", "0", "command", *rest])
    if head == "image":
        return "executors.0.image"
    if head == "steps":
        return ".".join(["executors", *rest])
    if head == "labels":
        return ".".join(["tags", *rest])
    if head == "tenant":
        return f"tags.{TENANT_TAG}"
    return ".".join(parts)


# --- JobRecord -> TES -------------------------------------------------------------------------------------

def to_task(record: dict, view: View) -> dict:
    """The TES task of a job (a JobRecord as JSON), with only the fields TES defines, in `view`."""
    state = tes_state(record["state"], record.get("exit_code"))
    task: dict[str, Any] = {"id": record["job_id"], "state": state.value}
    if view == "MINIMAL":
        return task
    spec = record.get("spec") or {}
    labels = dict(spec.get("labels") or {})
    description = labels.pop(DESCRIPTION_LABEL, None)
    full = view == "FULL"
    task.update({
        "name": spec.get("name", ""),
        **({"description": description} if description else {}),
        "inputs": [_tes_input(i, full) for i in spec.get("inputs", [])],
        "outputs": [{"path": o["path"], "url": o["url"]} for o in spec.get("outputs", [])],
        "resources": _tes_resources(spec),
        "executors": _tes_executors(spec),
        "tags": labels,
        "logs": [_task_log(record, full)],
    })
    if record.get("history"):
        task["creation_time"] = record["history"][0]["time"]
    return task


def _tes_input(item: dict, full: bool) -> dict:
    found = {"path": item["path"], "type": "FILE"}
    if "url" in item:
        found["url"] = item["url"]
    if full and "content" in item:  # BASIC leaves contents out
        found["content"] = item["content"]
    return found


def _tes_resources(spec: dict) -> dict:
    resources = spec.get("resources") or {}
    found: dict[str, Any] = {}
    if resources.get("cpus") is not None:
        found["cpu_cores"] = resources["cpus"]
    if resources.get("memory_gb") is not None:
        found["ram_gb"] = resources["memory_gb"]
    parameters: dict[str, str] = {}
    for key, (path, _) in BACKEND_PARAMETERS.items():
        value = (resources if path[0] == "resources" else spec).get(path[-1])
        if value is None or value == []:
            continue
        parameters[key] = ",".join(value) if isinstance(value, list) else str(value)
    found["backend_parameters"] = parameters
    return found


def _tes_executors(spec: dict) -> list[dict]:
    steps = spec.get("steps") or [{"command": spec.get("command", []), "image": spec.get("image")}]
    executors = []
    for step in steps:
        executor = {"image": step.get("image") or "", "command": step["command"]}
        executor.update({k: step[k] for k in ("workdir", "stdin", "stdout", "stderr") if step.get(k)})
        if step.get("env"):
            executor["env"] = step["env"]
        if step.get("ignore_error"):
            executor["ignore_error"] = True
        executors.append(executor)
    return executors


def _task_log(record: dict, full: bool) -> dict:
    """What happened to the task, as TES's TaskLog: the run's times, the exit code once it ended, and in
    `metadata` (and, in the FULL view, `system_logs`) Continuum's own say: where it runs and why it waits."""
    history = record.get("history", [])
    started = _first(history, JobState.started)
    ended = next((h for h in reversed(history) if JobState(h["state"]).terminal), None)
    log: dict[str, Any] = {"logs": [], "outputs": []}
    if started:
        log["start_time"] = started["time"]
    if ended and started:
        log["end_time"] = ended["time"]
    if record.get("exit_code") is not None:
        log["logs"] = [{"exit_code": record["exit_code"],
                        **({"start_time": started["time"]} if started else {}),
                        **({"end_time": ended["time"]} if ended and started else {})}]
    metadata = {"continuum.state": record["state"], "continuum.tenant": record["tenant"],
                "continuum.attempt": str(record.get("attempt", 0))}
    if record.get("site"):
        metadata["continuum.site"] = record["site"]
    if record.get("reasons"):
        metadata["continuum.reasons"] = "; ".join(record["reasons"])
    log["metadata"] = metadata
    if full:
        log["system_logs"] = [_history_line(h) for h in history]
    return log


def _first(history: list[dict], state: JobState) -> dict | None:
    return next((h for h in history if h["state"] == state), None)


def _history_line(entry: dict) -> str:
    """One line a person reads: when, what, where and why."""
    said = [entry["time"], entry["state"]]
    if entry.get("site"):
        said.append(f"at {entry['site']}")
    if entry.get("exit_code") is not None:
        said.append(f"exit code {entry['exit_code']}")
    if entry.get("reason"):
        said.append(f"({entry['reason']})")
    elif entry.get("reasons"):
        said.append(f"({'; '.join(entry['reasons'])})")
    return " ".join(said)


def service_info(version: str, created_at: datetime) -> dict:
    """GA4GH service-info, with the backend parameters Continuum reads."""
    return {
        "id": "eu.continuum.tes", "name": "Continuum",
        "type": {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"},
        "description": "Continuum: AI compute across Europe's public supercomputers and sovereign GPU clouds. "
                       "Placement goes in resources.backend_parameters.",
        "organization": {"name": "Continuum", "url": "https://continuum.invalid"},
        "version": version, "created_at": created_at.isoformat(), "environment": "production",
        "storage": ["file:///"],
        "tesResources_backend_parameters": list(BACKEND_PARAMETERS),
    }
