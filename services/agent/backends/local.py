"""The local site: runs a job as real processes on this machine, its GPU slots in CUDA_VISIBLE_DEVICES.

A job runs its `command`, or its `steps` one after another, each in a process group of its own: the first that
exits non-zero ends the job with its exit code, unless it has `ignore_error`. Its files are staged beneath the
site's `files_root` (services/agent/staging.py): inputs before the first step, outputs after the last. The
walltime counts from the first step and covers them all; a cancellation stops the step that runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from services.agent.backends.base import Outcome, SlotBackend, with_outputs
from services.agent.staging import StagingError, stage_in, step_files
from shared.contracts.jobs import Dispatch, Step

# how long a process has to end after SIGTERM before it is killed
TERM_GRACE_S = 5.0


class LocalBackend(SlotBackend):
    async def run(self, order: Dispatch, slots: list[int]) -> Outcome:
        spec = order.spec
        root = self.site.files_root
        if spec.staged_paths():
            if root is None or (why := self.site.cannot_stage(spec)):  # the agent refuses such a job before this
                return Outcome(None, f"cannot stage the job's files: {why or 'the site has no files_root'}")
            try:
                await asyncio.to_thread(stage_in, spec, root)
            except StagingError as e:
                return Outcome(None, f"cannot stage the job's inputs: {e}")
        # the site's own variables (base.SITE_ENV) last: no step may move the job off its GPU slots
        env = dict(os.environ)
        ours = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, slots)), "CONTINUUM_JOB_ID": order.job_id}
        steps = spec.steps or [Step(command=spec.command)]
        deadline = asyncio.get_running_loop().time() + spec.walltime_s
        outcome = Outcome(0)
        for i, step in enumerate(steps):
            if (left_s := deadline - asyncio.get_running_loop().time()) <= 0:
                return Outcome(None, "walltime exceeded")
            ran = await _run_step(step, i if spec.steps else None, env | step.env | ours, root, left_s)
            if ran.exit_code is not None and step.ignore_error:
                continue  # it does not count: neither its exit code nor its failure to start
            outcome = ran
            if ran.exit_code != 0:
                break
        if spec.outputs and root is not None and outcome.exit_code is not None:
            outcome = await with_outputs(order, root, outcome)
        return outcome


async def _run_step(step: Step, i: int | None, env: dict[str, str], root: str | None, left_s: float) -> Outcome:
    """One step, until it exits or the walltime left runs out. `i` None: the job's own command, with no steps."""
    where = f"steps.{i}: " if i is not None else ""
    try:
        with step_files(step, i or 0, root) as (stdin, stdout, stderr):
            null = asyncio.subprocess.DEVNULL
            process = await asyncio.create_subprocess_exec(
                *step.command, cwd=step.workdir, env=env, stdin=null if stdin is None else stdin,
                stdout=null if stdout is None else stdout, stderr=null if stderr is None else stderr,
                start_new_session=True)
    except StagingError as e:
        return Outcome(None, str(e))
    except OSError as e:
        return Outcome(127, f"{where}cannot start {step.command[0]!r}: {e.strerror or e}")
    try:
        exit_code = await asyncio.wait_for(process.wait(), timeout=left_s)
        _kill_group(process.pid)  # what the step left running in the background ends with it
        return Outcome(exit_code, f"{where}exited {exit_code}" if exit_code and i is not None else None)
    except TimeoutError:
        await _stop(process)
        return Outcome(None, "walltime exceeded")
    except asyncio.CancelledError:
        await _stop(process)
        raise


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the job's process group, then SIGKILL it if it lingers."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout=grace)
            _kill_group(process.pid)
            return
        except TimeoutError:
            continue
