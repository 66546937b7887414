"""services/agent/backends/simulated.py: simulated_outcome() reads the run's length and exit code from labels;
a run lasts at least that long."""

from __future__ import annotations

import time

import pytest
import uvloop

from services.agent.backends.simulated import (
    EXIT_CODE_LABEL,
    RUNTIME_LABEL,
    last,
    simulated_outcome,
)
from shared.contracts.jobs import Dispatch, JobSpec


def order(labels: dict[str, str], walltime_s: int = 3600) -> Dispatch:
    spec = JobSpec(tenant="acme", command=["sleep", "1"], walltime_s=walltime_s, labels=labels)
    return Dispatch(job_id="j1", tenant="acme", site="sim", gpu_type="H100", attempt=1, spec=spec)


def test_label_names():
    assert (RUNTIME_LABEL, EXIT_CODE_LABEL) == ("sim.runtime_s", "sim.exit_code")


def test_labels_are_parsed():
    runtime, exit_code = simulated_outcome(order({"sim.runtime_s": "12.5", "sim.exit_code": "3"}))
    assert runtime == 12.5
    assert isinstance(runtime, float)
    assert exit_code == 3
    assert isinstance(exit_code, int)


def test_defaults_are_zero_and_zero():
    assert simulated_outcome(order({})) == (0.0, 0)


def test_other_labels_are_ignored():
    assert simulated_outcome(order({"team": "vision", "sim.runtime_s": "2"})) == (2.0, 0)


def test_each_label_has_its_own_default():
    assert simulated_outcome(order({"sim.exit_code": "1"})) == (0.0, 1)
    assert simulated_outcome(order({"sim.runtime_s": "60"})) == (60.0, 0)


def test_a_negative_runtime_is_zero():
    assert simulated_outcome(order({"sim.runtime_s": "-5"})) == (0.0, 0)


def test_a_runtime_past_walltime_is_returned_as_asked():
    # the backend compares it with the walltime and reports "walltime exceeded"
    assert simulated_outcome(order({"sim.runtime_s": "7200"}, walltime_s=60)) == (7200.0, 0)


@pytest.mark.parametrize("labels", [
    {"sim.runtime_s": "soon"},
    {"sim.runtime_s": ""},
    {"sim.exit_code": "1.5"},
    {"sim.exit_code": "error"},
])
def test_a_bad_label_raises_value_error(labels):
    with pytest.raises(ValueError, match="bad simulation label"):
        simulated_outcome(order(labels))


def test_a_run_lasts_at_least_its_runtime_on_uvloop():
    """uvloop's timers have millisecond steps: its sleep of 10.5 ms ends early. A job is billed by the clock."""
    async def shortfalls(wait) -> int:  # how many of 20 waits end early
        short = 0
        for _ in range(20):
            start = time.monotonic()
            await wait(0.0105)
            short += time.monotonic() - start < 0.0105
        return short
    assert uvloop.run(shortfalls(last)) == 0  # asyncio.sleep: 20 of 20 short, on uvloop 0.23
