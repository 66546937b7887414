"""services/gateway/index.py, the index of jobs: the fold of job events into rows, filters and keyset pages, page
tokens, and applying batches again, out of order, after a restart or from two gateways at once. On SQLite and
PostgreSQL (the same tests; PostgreSQL's are skipped, with the reason, where there is none)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from services.gateway import index as index_module
from services.gateway.index import BadPageToken, JobsIndex
from shared.contracts.jobs import JobEvent, JobEventData, JobSpec, JobState
from shared.registry import apply_event
from shared.settings import Settings

T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where an index lives: a SQLite file, or a PostgreSQL schema (the same tests run on both)."""
    if request.param == "sqlite":
        return tmp_path / "gateway" / "jobs-index.sqlite3"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["by their index", "walking the jobs"])
def lookup(request, monkeypatch):
    """How a name prefix or a label is looked for: in its own index (few matches), or by walking the jobs newest
    first (many): the same answers either way."""
    if request.param == "walking the jobs":
        monkeypatch.setattr(index_module, "_FEW", 1)


@pytest.fixture
def index(target):
    opened = JobsIndex(target)
    yield opened
    opened.close()


def accepted(job_id: str, tenant: str = "acme", minute: float = 0, name: str = "",
             labels: dict[str, str] | None = None) -> JobEvent:
    spec = JobSpec(tenant=tenant, name=name, command=["python", "train.py"], labels=labels or {})
    return JobEvent.of("intake", JobEventData(job_id=job_id, tenant=tenant, state=JobState.accepted, spec=spec),
                       time=T0 + timedelta(minutes=minute))


def step(job_id: str, state: JobState, tenant: str = "acme", minute: float = 1, site: str | None = None,
         attempt: int = 0) -> JobEvent:
    data = JobEventData(job_id=job_id, tenant=tenant, state=state, site=site, attempt=attempt)
    return JobEvent.of("test", data, attempt, time=T0 + timedelta(minutes=minute))


class Stream:
    """Job events with the sequences a stream gives them, in the order published."""

    def __init__(self) -> None:
        self.events: list[tuple[int, JobEvent]] = []

    def add(self, *events: JobEvent) -> list[tuple[int, JobEvent]]:
        added = [(len(self.events) + i, event) for i, event in enumerate(events, start=1)]
        self.events += added
        return added

    def records(self) -> dict[str, dict]:
        """What the registry's fold makes of the events: what the index must hold."""
        records: dict[str, dict] = {}
        for seq, event in self.events:
            job_id = event.data.job_id
            records[job_id] = apply_event(records.get(job_id), event, seq) or records[job_id]
        return records


def run(job_id: str, tenant: str = "acme", minute: float = 0, site: str = "jean-zay", name: str = "",
        labels: dict[str, str] | None = None, until: JobState = JobState.succeeded) -> list[JobEvent]:
    """A job's events, from accepted to `until` along a normal run."""
    path = [JobState.placed, JobState.dispatched, JobState.started, JobState.succeeded]
    steps = path[:path.index(until) + 1] if until in path else [until]
    return [accepted(job_id, tenant, minute, name, labels),
            *(step(job_id, s, tenant, minute + i, site=site if s != JobState.cancelled else None)
              for i, s in enumerate(steps, start=1))]


def ids(records: list[dict]) -> list[str]:
    return [r["job_id"] for r in records]


def fill(index: JobsIndex, stream: Stream) -> None:
    """Forty jobs of three tenants at three sites, in every state, two minutes apart, in batches of 25 events."""
    states = [JobState.succeeded, JobState.started, JobState.placed, JobState.failed, JobState.cancelled]
    for n in range(40):
        stream.add(*run(f"job-{n:02d}", tenant=("acme", "beta", "gamma")[n % 3], minute=2 * n,
                        site=("jean-zay", "scw-par", "leonardo")[(n // 2) % 3],
                        name=f"{'train' if n % 4 else 'eval'}-{n}", labels={"team": "ml" if n % 5 else "ops"},
                        until=states[n % 5]))
    for start in range(0, len(stream.events), 25):
        index.apply(stream.events[start:start + 25])


def everything(index: JobsIndex, **filters) -> list[dict]:
    """Every page of a query, followed to its end."""
    records, token = index.page(limit=7, **filters)
    while token:
        more, token = index.page(limit=7, page_token=token, **filters)
        records += more
    return records


# --- the fold ------------------------------------------------------------------------------------------------

def test_a_job_holds_the_record_the_registry_folds(index):
    stream = Stream()
    index.apply(stream.add(*run("j1", until=JobState.started)))
    assert index.get("j1") == stream.records()["j1"]
    assert index.get("j1")["state"] == "started" and index.get("j1")["site"] == "jean-zay"
    assert index.get("nope") is None
    assert index.last_seq() == 4


def test_the_columns_follow_the_record(index):
    stream = Stream()
    index.apply(stream.add(*run("j1", minute=10, name="train-llm", labels={"team": "ml"},
                                until=JobState.started)))
    row = index._writer.execute("SELECT tenant, state, site, name, submitted, updated, seq FROM jobs").fetchall()
    assert [tuple(r) for r in row] == [("acme", "started", "jean-zay", "train-llm", "2025-05-01T12:10:00.000000Z",
                                        "2025-05-01T12:13:00.000000Z", 4)]
    index.apply(stream.add(step("j1", JobState.succeeded, minute=20, site="jean-zay")))
    assert index.page(state="succeeded")[0][0]["history"][-1]["state"] == "succeeded"
    assert index.page(state="started")[0] == []


def test_a_job_refused_at_once_is_listed_from_its_refusal(index):
    stream = Stream()
    refused = JobEvent.of("intake", JobEventData(job_id="bad", tenant="acme", state=JobState.rejected,
                                                 reason="no such GPU"), time=T0 + timedelta(minutes=3))
    index.apply(stream.add(refused, *run("ok", minute=1)))
    assert ids(index.page(tenant="acme")[0]) == ["bad", "ok"]
    assert ids(index.page(state="rejected", since=T0 + timedelta(minutes=3))[0]) == ["bad"]


# --- filters and pages ---------------------------------------------------------------------------------------

def test_each_filter_alone(index, lookup):
    stream = Stream()
    fill(index, stream)
    records = stream.records()

    def expected(keep) -> list[str]:
        return sorted((job_id for job_id, r in records.items() if keep(r)), reverse=True)

    assert ids(everything(index)) == expected(lambda r: True)
    assert ids(everything(index, tenant="beta")) == expected(lambda r: r["tenant"] == "beta")
    assert ids(everything(index, state="started")) == expected(lambda r: r["state"] == "started")
    assert ids(everything(index, state=["failed", JobState.cancelled])) == \
        expected(lambda r: r["state"] in ("failed", "cancelled"))
    assert ids(everything(index, site="scw-par")) == expected(lambda r: r["site"] == "scw-par")
    assert ids(everything(index, since=T0 + timedelta(minutes=60))) == expected(lambda r: r["job_id"] >= "job-30")
    assert ids(everything(index, name_prefix="eval-")) == expected(lambda r: r["spec"]["name"].startswith("eval-"))
    assert ids(everything(index, tag=("team", "ops"))) == expected(lambda r: r["spec"]["labels"]["team"] == "ops")
    assert ids(everything(index, tag=("team", None))) == expected(lambda r: True)
    assert everything(index, tag=("nobody", None)) == []
    assert all(0 < len(expected(keep)) < 40 for keep in (lambda r: r["state"] == "started",
                                                         lambda r: r["site"] == "scw-par"))


def test_filters_combined(index, lookup):
    stream = Stream()
    fill(index, stream)
    records = stream.records()
    found = everything(index, tenant="acme", state=["succeeded", "failed", "cancelled"], name_prefix="train",
                       since=T0 + timedelta(minutes=10), tag=("team", "ml"))
    assert ids(found) == sorted((j for j, r in records.items() if r["tenant"] == "acme"
                                 and r["state"] in ("succeeded", "failed", "cancelled")
                                 and r["spec"]["name"].startswith("train") and j >= "job-05"
                                 and r["spec"]["labels"]["team"] == "ml"), reverse=True)
    assert found
    assert ids(everything(index, tenant="acme", site="scw-par", state="placed")) == \
        sorted((j for j, r in records.items() if (r["tenant"], r["site"], r["state"]) == ("acme", "scw-par", "placed")),
               reverse=True)


def test_pages_through_everything_without_a_gap_or_a_repeat(index):
    stream = Stream()
    fill(index, stream)
    seen, token, pages = [], None, 0
    while True:
        records, token = index.page(limit=6, page_token=token)
        seen += ids(records)
        pages += 1
        if token is None:
            break
    assert seen == sorted(stream.records(), reverse=True)
    assert pages == 7  # 40 jobs, 6 a page: the last page has 4, and says it is the last


def test_a_page_that_ends_the_list_says_so(index):
    stream = Stream()
    index.apply(stream.add(*(accepted(f"j{n}", minute=n) for n in range(4))))
    first, token = index.page(limit=2)
    last, after = index.page(limit=2, page_token=token)
    assert (ids(first), ids(last), after) == (["j3", "j2"], ["j1", "j0"], None)
    assert index.page(limit=4) == (first + last, None)


def test_jobs_submitted_at_one_instant_are_paged_by_their_ids(index):
    stream = Stream()
    index.apply(stream.add(*(accepted(f"same-{n}") for n in range(5)), accepted("later", minute=1)))
    assert ids(everything(index)) == ["later", "same-4", "same-3", "same-2", "same-1", "same-0"]
    first, token = index.page(limit=3)
    assert ids(first) == ["later", "same-4", "same-3"]
    assert ids(index.page(limit=3, page_token=token)[0]) == ["same-2", "same-1", "same-0"]


def test_jobs_submitted_while_a_client_pages_do_not_shift_its_pages(index):
    stream = Stream()
    index.apply(stream.add(*(accepted(f"j{n}", minute=n) for n in range(6))))
    first, token = index.page(limit=3)
    index.apply(stream.add(accepted("newer", minute=30)))
    assert ids(first) == ["j5", "j4", "j3"]
    assert ids(index.page(limit=3, page_token=token)[0]) == ["j2", "j1", "j0"]


def test_a_name_prefix_is_a_prefix_in_byte_order(index, lookup):
    stream = Stream()
    names = ["abc", "abc-1", "abcd", "ab-c", "abd", "ABC", "ab\U0010ffff", "ab\U0010ffffz", "é-1", "éz"]
    index.apply(stream.add(*(accepted(f"n{i}", minute=i, name=name) for i, name in enumerate(names))))

    def named(prefix: str) -> list[str]:
        return sorted(r["spec"]["name"] for r in everything(index, name_prefix=prefix))

    assert named("abc") == ["abc", "abc-1", "abcd"]
    assert named("ab\U0010ffff") == ["ab\U0010ffff", "ab\U0010ffffz"]
    assert named("é") == ["é-1", "éz"]
    assert named("") == sorted(names)


# --- page tokens ---------------------------------------------------------------------------------------------

def test_a_bad_or_tampered_token_is_refused(index):
    stream = Stream()
    index.apply(stream.add(*(accepted(f"j{n}", minute=n) for n in range(5))))
    _, token = index.page(limit=2)
    assert token and token.isascii() and "=" not in token
    assert all(c.isalnum() or c in "-_" for c in token)  # url-safe as it is
    tampered = [token[:-1] + ("A" if token[-1] != "A" else "B"), token[:10], token + "A", "", "!!!", "é",
                "x" * 5000, token[:5] + "+" + token[6:]]
    for bad in tampered:
        with pytest.raises(BadPageToken):
            index.page(limit=2, page_token=bad)


def test_a_token_of_another_query_is_refused(index):
    stream = Stream()
    index.apply(stream.add(*(accepted(f"j{n}", minute=n) for n in range(5))))
    _, token = index.page(tenant="acme", limit=2)
    assert index.page(tenant="acme", limit=3, page_token=token)[0]  # another page size is the same query
    for other in ({"tenant": "beta"}, {"tenant": "acme", "state": "accepted"}, {"tenant": "acme", "name_prefix": "x"},
                  {"tenant": "acme", "since": T0}, {"tenant": "acme", "tag": ("team", None)}):
        with pytest.raises(BadPageToken):
            index.page(limit=2, page_token=token, **other)


def test_a_token_of_another_index_is_refused(index, tmp_path):
    stream = Stream()
    index.apply(stream.add(*(accepted(f"j{n}", minute=n) for n in range(5))))
    other = JobsIndex(tmp_path / "other.sqlite3")
    try:
        other.apply(stream.events)
        _, token = other.page(limit=2)
        with pytest.raises(BadPageToken):
            index.page(limit=2, page_token=token)
    finally:
        other.close()


def test_a_token_outlives_the_gateway_that_gave_it(target):
    stream = Stream()
    first = JobsIndex(target)
    first.apply(stream.add(*(accepted(f"j{n}", minute=n) for n in range(5))))
    _, token = first.page(limit=2)
    first.close()
    again = JobsIndex(target)
    try:
        assert ids(again.page(limit=2, page_token=token)[0]) == ["j2", "j1"]
    finally:
        again.close()


def test_a_bad_limit_or_state_is_refused(index):
    for limit in (0, -1, index_module.MAX_PAGE + 1):
        with pytest.raises(ValueError, match="limit"):
            index.page(limit=limit)
    with pytest.raises(ValueError, match="'running'"):
        index.page(state="running")


# --- applying again, out of order, after a restart -----------------------------------------------------------

def test_a_batch_applied_twice_changes_nothing(index):
    stream = Stream()
    batch = stream.add(*run("j1"), *run("j2", minute=5))
    index.apply(batch)
    before = everything(index)
    assert index.apply(batch) == 10
    assert index.apply(batch[3:5]) == 10
    assert everything(index) == before
    assert [len(r["history"]) for r in before] == [5, 5]


def test_an_event_stored_twice_is_applied_once(index):
    # a step published again after the stream's duplicate window: the same event id at a later sequence
    stream = Stream()
    index.apply(stream.add(*run("j1", until=JobState.started)))
    again = stream.add(step("j1", JobState.placed, site="jean-zay"))
    assert index.apply(again) == 5
    assert [h["state"] for h in index.get("j1")["history"]] == ["accepted", "placed", "dispatched", "started"]


def test_events_out_of_order_within_a_batch_fold_as_in_order(target, tmp_path):
    stream = Stream()
    stream.add(*run("j1", until=JobState.started), *run("j2", minute=3, until=JobState.failed))
    in_order, shuffled = JobsIndex(tmp_path / "in-order.sqlite3"), JobsIndex(target)
    try:
        in_order.apply(stream.events)
        shuffled.apply(list(reversed(stream.events)))
        assert everything(shuffled) == everything(in_order) == [stream.records()[j] for j in ("j2", "j1")]
        # the accepted event's time is when the job was submitted, whichever came first
        assert ids(shuffled.page(since=T0 + timedelta(minutes=3))[0]) == ["j2"]
        assert shuffled.last_seq() == len(stream.events)
    finally:
        in_order.close()
        shuffled.close()


def test_a_restart_reads_on_from_the_last_sequence(target):
    stream = Stream()
    stream.add(*(event for n in range(10) for event in run(f"j{n}", minute=n)))
    first = JobsIndex(target)
    first.apply(stream.events[:23])
    first.close()

    again = JobsIndex(target)
    try:
        after = again.last_seq()
        assert after == 23
        again.apply([(seq, event) for seq, event in stream.events if seq > after])
        assert everything(again) == [stream.records()[f"j{n}"] for n in reversed(range(10))]
        assert again.apply(stream.events) == 50  # the whole stream again: nothing doubled
        assert all(len(r["history"]) == 5 for r in everything(again))
    finally:
        again.close()


def test_a_batch_that_fails_leaves_neither_rows_nor_its_sequence(index, monkeypatch):
    stream = Stream()
    index.apply(stream.add(*run("j1")))
    columns = index_module._columns

    def fails_on_j3(job_id, *args):
        if job_id == "j3":
            raise RuntimeError("disk full")
        return columns(job_id, *args)
    monkeypatch.setattr(index_module, "_columns", fails_on_j3)
    batch = stream.add(*run("j2", minute=2), *run("j3", minute=3))
    with pytest.raises(RuntimeError, match="disk full"):
        index.apply(batch)
    assert index.last_seq() == 5
    assert ids(everything(index)) == ["j1"]

    monkeypatch.setattr(index_module, "_columns", columns)
    assert index.apply(batch) == 15
    assert ids(everything(index)) == ["j3", "j2", "j1"]


def test_two_gateways_sharing_one_index_apply_every_event_once(target):
    """Two followers of one stream write the same events in batches of their own, at once."""
    stream = Stream()
    stream.add(*(event for n in range(30) for event in run(f"j{n:02d}", minute=n, until=JobState.started)))
    gateways = [JobsIndex(target), JobsIndex(target)]
    errors: list[BaseException] = []

    def follow(gateway: JobsIndex, size: int) -> None:
        try:
            for start in range(0, len(stream.events), size):
                gateway.apply(stream.events[start:start + size])
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=follow, args=(g, size)) for g, size in zip(gateways, (7, 11), strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        records = stream.records()
        for gateway in gateways:
            assert gateway.last_seq() == len(stream.events)
            assert everything(gateway) == [records[f"j{n:02d}"] for n in reversed(range(30))]
    finally:
        for gateway in gateways:
            gateway.close()


def test_a_gateway_behind_another_never_writes_over_what_it_wrote(target, monkeypatch):
    """One gateway reads a job's row and stops there; another, further on in the stream, applies the job's
    later events meanwhile. The first must not write its older fold over them: a batch holds the index's lock
    from its read to its commit (fails with the lock removed)."""
    stream = Stream()
    stream.add(*run("j1", until=JobState.started))
    behind, ahead = JobsIndex(target), JobsIndex(target)
    read, go_on = threading.Event(), threading.Event()
    current = behind._current

    def read_then_wait(db, job_ids):
        rows = current(db, job_ids)
        read.set()
        go_on.wait(10)
        return rows
    monkeypatch.setattr(behind, "_current", read_then_wait)
    first = threading.Thread(target=behind.apply, args=(stream.events[:2],))
    first.start()
    try:
        assert read.wait(10)
        second = threading.Thread(target=ahead.apply, args=(stream.events,))
        second.start()
        second.join(0.5)  # with the lock it waits for the first; without, it is done by now
        go_on.set()
        first.join(10)
        second.join(10)
        assert ahead.get("j1") == behind.get("j1") == stream.records()["j1"]
        assert ahead.last_seq() == 4
    finally:
        go_on.set()
        behind.close()
        ahead.close()


def test_the_index_opens_where_the_settings_say(tmp_path):
    settings = Settings(data_dir=tmp_path)
    opened = JobsIndex.from_settings(settings)
    try:
        assert opened.target == tmp_path / "jobs-index.sqlite3" and settings.index.exists()
    finally:
        opened.close()
