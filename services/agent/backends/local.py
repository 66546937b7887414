"""The local site: runs `command` as a real process on this machine, its GPU slots in CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from services.agent.backends.base import Outcome, SlotBackend
from shared.contracts.jobs import Dispatch

# how long a process has to end after SIGTERM before it is killed
TERM_GRACE_S = 5.0


class LocalBackend(SlotBackend):
    async def run(self, order: Dispatch, slots: list[int]) -> Outcome:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, slots)), CONTINUUM_JOB_ID=order.job_id)
        try:
            process = await asyncio.create_subprocess_exec(
                *order.spec.command, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            return Outcome(127, f"cannot start {order.spec.command[0]!r}: {e.strerror or e}")
        try:
            exit_code = await asyncio.wait_for(process.wait(), timeout=order.spec.walltime_s)
            _kill_group(process.pid)  # what the job left running in the background ends with it
            return Outcome(exit_code)
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
