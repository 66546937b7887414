"""services/routing/reservations.py: the GPUs placed jobs hold at one site, as a pure document."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.routing.reservations import (
    NoCapacity,
    Reservation,
    committed,
    free,
    holds,
    jobs,
    metered,
    overflow_held,
    overflow_placed,
    release,
    reserve,
    reserved,
    totals,
)

TOTAL = {"H100": 8, "L40S": 4}


def test_an_empty_document_holds_nothing():
    for doc in (None, {}, {"jobs": {}}):
        assert reserved(doc) == {}
        assert free(doc, TOTAL) == TOTAL
        assert holds(doc, "j1") is False


def test_reserve_holds_the_gpus():
    doc = reserve(None, "j1", Reservation("acme", "H100", 3, attempt=1), TOTAL)
    assert doc["jobs"]["j1"]["gpu_type"] == "H100" and doc["jobs"]["j1"]["gpus"] == 3
    assert doc["jobs"]["j1"]["attempt"] == 1 and "overflow_placed" not in doc
    assert holds(doc, "j1")
    assert reserved(doc) == {"H100": 3}
    assert free(doc, TOTAL) == {"H100": 5, "L40S": 4}


def test_reservations_add_up_by_type():
    doc = reserve(None, "j1", Reservation("acme", "H100", 3), TOTAL)
    doc = reserve(doc, "j2", Reservation("acme", "H100", 2), TOTAL)
    doc = reserve(doc, "j3", Reservation("acme", "L40S", 4), TOTAL)
    assert reserved(doc) == {"H100": 5, "L40S": 4}
    assert free(doc, TOTAL) == {"H100": 3, "L40S": 0}


def test_reserve_does_not_change_the_document_it_was_given():
    doc = reserve(None, "j1", Reservation("acme", "H100", 3), TOTAL)
    before = copy.deepcopy(doc)
    reserve(doc, "j2", Reservation("acme", "H100", 1), TOTAL)
    assert doc == before


def test_reserving_all_free_gpus_is_allowed_but_one_more_is_not():
    doc = reserve(None, "j1", Reservation("acme", "H100", 8), TOTAL)
    assert free(doc, TOTAL)["H100"] == 0
    with pytest.raises(NoCapacity, match="1 H100 no longer free"):
        reserve(doc, "j2", Reservation("acme", "H100", 1), TOTAL)


def test_no_capacity_for_a_type_the_site_lacks():
    with pytest.raises(NoCapacity):
        reserve(None, "j1", Reservation("acme", "A100", 1), TOTAL)


def test_a_job_without_gpus_can_always_be_reserved():
    doc = reserve(None, "big", Reservation("acme", "H100", 8), TOTAL)
    doc = reserve(doc, "cpu-only", Reservation("acme", "none", 0), TOTAL)
    assert holds(doc, "cpu-only")
    assert free(doc, TOTAL) == {"H100": 0, "L40S": 4}


def test_reserve_is_idempotent():
    doc = reserve(None, "j1", Reservation("acme", "H100", 3), TOTAL)
    assert reserve(doc, "j1", Reservation("acme", "H100", 3), TOTAL) is None
    # even if the repeat asks for something else, or the GPUs are gone: the job holds what it holds
    full = reserve(doc, "j2", Reservation("acme", "H100", 5), TOTAL)
    assert reserve(full, "j1", Reservation("acme", "H100", 8), TOTAL) is None


def test_release_frees_the_gpus():
    doc = reserve(None, "j1", Reservation("acme", "H100", 3), TOTAL)
    doc = reserve(doc, "j2", Reservation("acme", "H100", 2), TOTAL)
    after = release(doc, "j1")
    assert not holds(after, "j1")
    assert holds(after, "j2")
    assert free(after, TOTAL) == {"H100": 6, "L40S": 4}
    assert holds(doc, "j1")  # the input is left alone


def test_release_of_a_job_not_held_is_none():
    assert release(None, "j1") is None
    assert release({"jobs": {}}, "j1") is None
    doc = reserve(None, "j1", Reservation("acme", "H100", 1), TOTAL)
    assert release(doc, "other") is None
    assert release(release(doc, "j1"), "j1") is None


def test_release_before_attempt_only_frees_an_older_attempt():
    doc = reserve(None, "j1", Reservation("acme", "H100", 2, attempt=2), TOTAL)
    # a requeue of attempt 2 (or 1) must not free the placement of attempt 2
    assert release(doc, "j1", before_attempt=2) is None
    assert release(doc, "j1", before_attempt=1) is None
    # the requeue of attempt 2 frees an attempt-1 hold, or the attempt-2 hold once attempt 3 is asked
    assert not holds(release(doc, "j1", before_attempt=3), "j1")
    older = reserve(None, "j1", Reservation("acme", "H100", 2, attempt=1), TOTAL)
    assert not holds(release(older, "j1", before_attempt=2), "j1")


def test_release_before_attempt_treats_a_missing_attempt_as_zero():
    doc = {"jobs": {"j1": {"tenant": "acme", "gpu_type": "H100", "gpus": 2}}}  # written before attempts (and totals)
    assert release(doc, "j1", before_attempt=0) is None
    after = release(doc, "j1", before_attempt=1)
    assert jobs(after) == {} and reserved(after) == {}


def test_the_totals_follow_every_reserve_and_release():
    doc = reserve(None, "j1", Reservation("acme", "H100", 3, overflow=True, cost_eur=2.0), TOTAL)
    doc = reserve(doc, "j2", Reservation("acme", "L40S", 1, allocation_h=5.0), TOTAL)
    doc = reserve(doc, "j3", Reservation("beta", "H100", 2, cost_eur=1.0), TOTAL)
    assert overflow_held(doc) == {"H100": 3} and committed(doc, "acme") == (2.0, 5.0)
    doc = release(doc, "j1")
    assert free(doc, TOTAL) == {"H100": 6, "L40S": 3} and overflow_held(doc) == {"H100": 0}
    assert committed(doc, "acme") == (0.0, 5.0) and committed(doc, "beta") == (1.0, 0.0)


operations = st.lists(
    st.tuples(st.sampled_from(("reserve", "release")), st.sampled_from(("j1", "j2", "j3", "j4", "j5")),
              st.sampled_from(("H100", "L40S", "A100")), st.integers(0, 9), st.integers(0, 3)),
    max_size=40)


@settings(max_examples=200, deadline=None, database=None)
@given(ops=operations)
def test_random_reserve_and_release_never_make_free_negative(ops):
    doc: dict | None = None
    for op, job_id, gpu_type, gpus, attempt in ops:
        if op == "reserve":
            try:
                new = reserve(doc, job_id, Reservation("acme", gpu_type, gpus, attempt=attempt), TOTAL)
            except NoCapacity:
                new = None
        else:
            new = release(doc, job_id, before_attempt=attempt if gpus % 2 else None)
        if new is not None:
            doc = new
        available = free(doc, TOTAL)
        assert all(n >= 0 for n in available.values()), (ops, doc)
        assert set(available) == set(TOTAL)
        # the totals kept in the document are exactly the sum of its jobs
        summed = totals({"jobs": (doc or {}).get("jobs", {})})["held"]
        assert reserved(doc) == {t: n for t, n in summed.items() if n}
        for t, n in TOTAL.items():
            assert available[t] == n - summed.get(t, 0)


def test_overflow_placements_are_counted_in_the_same_write():
    doc = reserve(None, "j1", Reservation("lab", "H100", 2, overflow=True), TOTAL)
    doc = reserve(doc, "j2", Reservation("lab", "H100", 1, overflow=True), TOTAL)
    doc = reserve(doc, "j3", Reservation("startup", "H100", 1), TOTAL)
    assert overflow_placed(doc) == {"lab": 2}
    assert reserve(doc, "j1", Reservation("lab", "H100", 2, overflow=True), TOTAL) is None  # no double count
    assert overflow_placed(release(doc, "j1")) == {"lab": 2}  # a count of placements, not of current holdings


def test_overflow_jobs_placed_at_once_cannot_take_more_than_the_share_together():
    # half of the 8 H100 lent to overflow: three tries that each saw the share free do not all get in
    doc = reserve(None, "j1", Reservation("lab", "H100", 2, overflow=True), TOTAL, overflow_share=0.5)
    doc = reserve(doc, "j2", Reservation("lab", "H100", 2, overflow=True), TOTAL, overflow_share=0.5)
    with pytest.raises(NoCapacity, match="overflow share"):
        reserve(doc, "j3", Reservation("lab", "H100", 2, overflow=True), TOTAL, overflow_share=0.5)
    # the site's own work is not overflow, and the other type's share is its own
    doc = reserve(doc, "j4", Reservation("local", "H100", 2), TOTAL, overflow_share=0.5)
    doc = reserve(doc, "j5", Reservation("lab", "L40S", 2, overflow=True), TOTAL, overflow_share=0.5)
    assert overflow_held(doc) == {"H100": 4, "L40S": 2} and free(doc, TOTAL) == {"H100": 2, "L40S": 2}


def test_a_second_try_at_the_same_attempt_uses_the_gpus_already_held_and_a_new_attempt_takes_them_over():
    first = reserve(None, "j1", Reservation("acme", "H100", 3, attempt=0, token="a"), TOTAL)
    assert reserve(first, "j1", Reservation("acme", "H100", 3, attempt=0, token="b"), TOTAL) is None
    assert jobs(first)["j1"].token == "a"
    # an attempt the job left: its GPUs count as free for the next one, which replaces it
    again = reserve(first, "j1", Reservation("acme", "H100", 8, attempt=1, token="c"), TOTAL)
    assert jobs(again)["j1"].attempt == 1 and reserved(again) == {"H100": 8}


def test_a_try_that_lost_gives_back_only_the_reservation_it_made():
    doc = reserve(None, "j1", Reservation("acme", "H100", 3, token="winner"), TOTAL)
    assert release(doc, "j1", token="loser") is None  # the winner's GPUs stay held
    assert reserved(release(doc, "j1", token="winner")) == {}


def test_a_reservation_beyond_what_the_tenant_may_commit_here_is_refused():
    doc = reserve(None, "j1", Reservation("acme", "H100", 1, cost_eur=0.006), TOTAL, limit=(0.01, 0.0))
    # a second try decided with the same room (0.01 EUR) while the first was being written
    with pytest.raises(NoCapacity, match="budget"):
        reserve(doc, "j2", Reservation("acme", "H100", 1, cost_eur=0.006), TOTAL, limit=(0.01, 0.0))
    assert reserve(doc, "j3", Reservation("beta", "H100", 1, cost_eur=0.006), TOTAL, limit=(0.01, 0.0))
    assert reserve(doc, "j4", Reservation("acme", "H100", 1, allocation_h=3.0), TOTAL, limit=(0.01, 5.0))


def test_an_ended_runs_cost_stays_committed_until_billing_metered_it():
    doc = reserve(None, "j1", Reservation("acme", "H100", 2, cost_eur=0.5), TOTAL)
    ended = release(doc, "j1", until_metered=True)
    assert free(ended, TOTAL)["H100"] == 8 and committed(ended, "acme") == (0.5, 0.0)  # GPUs back, cost not
    done = metered(ended, "j1")
    assert committed(done, "acme") == (0.0, 0.0) and metered(done, "j1") is None
    # metered before its GPUs came back: the release then frees it whole
    early = metered(doc, "j1")
    assert committed(release(early, "j1", until_metered=True), "acme") == (0.0, 0.0)
    # a run that never started is not metered: nothing stays
    assert committed(release(doc, "j1"), "acme") == (0.0, 0.0)
