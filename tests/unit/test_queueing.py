"""The shared wait estimate: a queue run out at full walltime, once (`run_out`) or kept as time moves (`drain`)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.queueing import drain, holding, run_out

TYPES = ("H100", "A100")


def test_a_queue_kept_while_the_clock_moves_answers_as_one_run_out_now():
    # 4 H100: 2 held until t=100, 2 until t=300; the line: 3 GPUs for 50 s, then 2 for 1000 s
    running = [("H100", 2, 100.0), ("H100", 2, 300.0)]
    queue = [("H100", 3, 50.0), ("H100", 2, 1000.0)]
    drained = drain({"H100": 0}, running, queue, clock_s=0.0)
    assert drained.timeless  # the line's first job waits for an end: nothing depends on the clock it ran at
    # the first starts at 300 (needs 3) and ends at 350; the second starts then: 2 left, the other 2 at 1350
    assert drained.start("H100", 2, 0.0) == 350
    assert drained.start("H100", 3, 0.0) == 1350
    # 80 s later nothing has changed: the same starts, 80 s nearer, as a fresh run-out of the holdings then
    later = [(t, n, left - 80) for t, n, left in running]
    assert drained.start("H100", 3, 80.0) - 80 == run_out({"H100": 0}, later, queue, "H100", 3) == 1270
    assert drained.start("H100", 5, 0.0) == math.inf  # the site has 4


def test_a_queue_whose_first_job_starts_at_once_depends_on_the_clock():
    drained = drain({"H100": 2}, [("H100", 2, 100.0)], [("H100", 2, 500.0)], clock_s=10.0)
    assert not drained.timeless
    assert drained.start("H100", 2, 10.0) == 100  # the held pair comes back at 100


def test_a_job_no_site_could_hold_blocks_all_behind_it():
    drained = drain({"H100": 1}, [], [("H100", 8, 60.0)])
    assert drained.start("H100", 1, 0.0) == math.inf
    assert run_out({"H100": 1}, [], [("H100", 8, 60.0)], "H100", 1) == math.inf


jobs = st.tuples(st.sampled_from(TYPES), st.integers(1, 4), st.floats(1, 1000).map(round))


@settings(max_examples=300, deadline=None)
@given(free=st.fixed_dictionaries({t: st.integers(0, 4) for t in TYPES}), running=st.lists(jobs, max_size=6),
       queue=st.lists(jobs, max_size=6), job=jobs, moved=st.floats(0, 1))
def test_a_timeless_drain_is_a_run_out_at_any_later_clock_before_an_end(free, running, queue, job, moved):
    """Kept and asked later (before any held job ends: an end changes the state, and a caller drains again),
    a timeless drain answers what a run-out of the holdings counted afresh would."""
    drained = drain(free, running, queue)
    first_end = min((left for _, _, left in running), default=0.0)
    clock = moved * first_end
    now = [(t, n, left - clock) for t, n, left in running]
    expected = run_out(free, now, queue, job[0], job[1])
    if drained.timeless or clock == 0:
        assert drained.start(job[0], job[1], clock) - clock == pytest.approx(expected)
    # and counting the holdings from an earlier instant is the same as counting them afresh
    assert run_out(free, running, queue, job[0], job[1], elapsed_s=clock) == pytest.approx(expected)


@settings(max_examples=300, deadline=None)
@given(free=st.fixed_dictionaries({t: st.integers(0, 4) for t in TYPES}), running=st.lists(jobs, max_size=6),
       queue=st.lists(jobs, max_size=8), split=st.integers(0, 8), job=jobs,
       moved=st.floats(0, 1, exclude_max=True))  # at a held job's end, the caller drains again
def test_a_queue_run_on_from_its_first_jobs_is_the_whole_run_out(free, running, queue, split, job, moved):
    """The replay keeps the run-out of a line's first jobs and runs it on for a job further back
    (`Drained.then`), at the clock it was drained at or, if timeless, later, before any held job ends."""
    first = drain(free, running, queue[:split])
    clock = moved * min((left for _, _, left in running), default=0.0) if first.timeless else 0.0
    now = [(t, n, left - clock) for t, n, left in running]
    expected = run_out(free, now, queue, job[0], job[1])
    on = first.then(queue[split:], clock)
    assert on.start(job[0], job[1], clock) - clock == pytest.approx(expected)
    whole = drain(free, running, queue, clock)
    assert (on.now, on.timeless, sorted(on.ends)) == (whole.now, whole.timeless, sorted(whole.ends))


@settings(max_examples=300, deadline=None)
@given(free=st.fixed_dictionaries({t: st.integers(0, 4) for t in TYPES}), running=st.lists(jobs, max_size=6),
       queue=st.lists(jobs, max_size=8), job=jobs)
def test_a_line_run_on_from_the_running_jobs_ends_kept_in_order_is_the_whole_run_out(free, running, queue, job):
    """The replay keeps each site's running jobs' ends in order as they start and end (`holding`), and runs a
    line on from them: the same run-out as from the running jobs themselves."""
    ends = sorted((left, t, n) for t, n, left in running)
    on, whole = holding(free, ends).then(queue, 0.0), drain(free, running, queue)
    assert (on.free, on.ends, on.now, on.timeless) == (whole.free, whole.ends, whole.now, whole.timeless)
    assert on.start(job[0], job[1], 0.0) == whole.start(job[0], job[1], 0.0)
    assert ends == sorted((left, t, n) for t, n, left in running)  # the caller's own ends are left as they were
