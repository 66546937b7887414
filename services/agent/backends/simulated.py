"""The simulated site: virtual GPUs, a run that lasts `sim.runtime_s` seconds and exits `sim.exit_code`.

For load tests, trace replays and the demo: nothing runs, but every slot, queue and event is real.
"""

from __future__ import annotations

import asyncio
import time

from services.agent.backends.base import Outcome, SlotBackend
from shared.contracts.jobs import Dispatch

RUNTIME_LABEL = "sim.runtime_s"
EXIT_CODE_LABEL = "sim.exit_code"


def simulated_outcome(order: Dispatch) -> tuple[float, int]:
    """(runtime in seconds, exit code) from the job's labels; a runtime past walltime is cut there."""
    labels = order.spec.labels
    try:
        runtime = max(0.0, float(labels.get(RUNTIME_LABEL, 0)))
        exit_code = int(labels.get(EXIT_CODE_LABEL, 0))
    except ValueError as e:
        raise ValueError(f"bad simulation label: {e}") from None
    return runtime, exit_code


async def last(seconds: float) -> None:
    """Take at least `seconds` of the clock the run is billed by: uvloop's timers count from the time its loop
    last read the clock, and a busy loop's sleep can end a few milliseconds early."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:  # noqa: ASYNC110 - waits for a time, not for another task
        await asyncio.sleep(left)


class SimulatedBackend(SlotBackend):
    async def run(self, order: Dispatch, slots: list[int]) -> Outcome:
        runtime, exit_code = simulated_outcome(order)
        if runtime > order.spec.walltime_s:
            await last(order.spec.walltime_s)
            return Outcome(None, "walltime exceeded")
        await last(runtime)
        return Outcome(exit_code)
