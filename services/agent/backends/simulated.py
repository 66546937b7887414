"""The simulated site: virtual GPUs, a run that lasts `sim.runtime_s` seconds and exits `sim.exit_code`.

For load tests, trace replays and the demo: nothing runs, but every slot, queue and event is real.
"""

from __future__ import annotations

import asyncio

from services.agent.backends.base import Backend, Outcome
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


class SimulatedBackend(Backend):
    async def run(self, order: Dispatch, slots: list[int]) -> Outcome:
        runtime, exit_code = simulated_outcome(order)
        if runtime > order.spec.walltime_s:
            await asyncio.sleep(order.spec.walltime_s)
            return Outcome(None, "walltime exceeded")
        await asyncio.sleep(runtime)
        return Outcome(exit_code)
