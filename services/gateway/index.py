"""The index of jobs: the read model that lists read (`GET /jobs`, TES ListTasks), kept by following the event
stream's job events.

The registry (a key-value bucket) answers one job by its id; a list filtered by tenant, state, site, time, name
or label and paged through 100,000 jobs needs SQL. Each job's row holds its whole JobRecord, folded by the
registry's own `apply_event` (so that a job in a list and its `jobs.get` agree), beside the columns lists
filter and sort on.

Catch-up without losing or doubling: the stream sequence the index has applied up to (`last_seq`) is written in
the same transaction as each batch's rows, so a gateway that restarts reads on from there. An event applied
again changes nothing (a record knows its events by id), so that gateways sharing one PostgreSQL index may all
apply every event: one batch at a time, under a lock.

SQLite by default (a file per gateway), PostgreSQL shared by the gateways (CONTINUUM_INDEX_URL): one SQL code
path (shared/sql.py). The SQL is blocking: the follower runs it in a thread, and so should its readers
(`asyncio.to_thread(index.page, ...)`, or a FastAPI endpoint declared with `def`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import queue
import secrets
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import orjson
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from shared import sql
from shared.bus import Bus
from shared.contracts.jobs import JobEvent, JobState
from shared.contracts.streams import Topology
from shared.contracts.subjects import Subjects
from shared.registry import apply_event
from shared.settings import Settings

log = structlog.get_logger()

MAX_PAGE = 1000


def _jobs(db: sql.Database) -> str:
    text = db.bytewise_text  # a name prefix is a range of names: in byte order, on either database
    return (f"CREATE TABLE jobs (job_id {text} PRIMARY KEY, tenant {text} NOT NULL, state {text} NOT NULL, "
            f"site {text}, name {text} NOT NULL, submitted {text} NOT NULL, updated {text} NOT NULL, "
            "seq BIGINT NOT NULL)")


def _labels(db: sql.Database) -> str:
    text = db.bytewise_text
    return (f"CREATE TABLE job_labels (job_id {text} NOT NULL, label_key {text} NOT NULL, "
            f"label_value {text} NOT NULL, PRIMARY KEY (job_id, label_key))")


MIGRATIONS: tuple[sql.Migration, ...] = (
    # the columns lists filter and sort on: `submitted` is the accepted event's time (the first event's for a
    # job refused at once), `updated` the newest event's, `seq` the newest stream sequence folded into the row
    _jobs,
    # the records beside them, read for the rows of a page only: scanning the index reads small rows
    lambda db: f"CREATE TABLE job_records (job_id {db.bytewise_text} PRIMARY KEY, record TEXT NOT NULL)",
    _labels,  # the spec's labels, for TES tag filters
    "CREATE INDEX job_labels_pair ON job_labels (label_key, label_value, job_id)",
    # newest first, by (submitted, job_id): each filter's index ends with the order of a page
    "CREATE INDEX jobs_submitted ON jobs (submitted, job_id)",
    "CREATE INDEX jobs_tenant_submitted ON jobs (tenant, submitted, job_id)",
    # a tenant's jobs in a state (TES ListTasks' usual question): without it, SQLite (no statistics) may walk
    # every job in that state to find a small tenant's
    "CREATE INDEX jobs_tenant_state_submitted ON jobs (tenant, state, submitted, job_id)",
    "CREATE INDEX jobs_state_submitted ON jobs (state, submitted, job_id)",
    "CREATE INDEX jobs_site_submitted ON jobs (site, submitted, job_id)",
    "CREATE INDEX jobs_name ON jobs (name)",
    # how far the index has read the stream, and the key that signs page tokens (shared by the gateways of one
    # PostgreSQL index, so that a page token works on any of them)
    "CREATE TABLE jobs_index_position (id INTEGER PRIMARY KEY, last_seq BIGINT NOT NULL)",
    "INSERT INTO jobs_index_position (id, last_seq) VALUES (1, 0)",
    "CREATE TABLE jobs_index_keys (name TEXT PRIMARY KEY, secret TEXT NOT NULL)",
)

_WRITE_LOCK = "continuum_jobs_index"
_ROW = ("job_id", "tenant", "state", "site", "name", "submitted", "updated", "seq")
_UPSERT_ROW = (f"INSERT INTO jobs ({', '.join(_ROW)}) VALUES ({', '.join('?' * len(_ROW))}) ON CONFLICT (job_id) "
               f"DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _ROW[1:])}")
_UPSERT_RECORD = ("INSERT INTO job_records (job_id, record) VALUES (?, ?) "
                  "ON CONFLICT (job_id) DO UPDATE SET record = excluded.record")
_TAG_BYTES = 16
_FEW = 2000  # see _few


class BadPageToken(ValueError):
    """A page token this index did not give for this query: garbled, tampered with, or another query's."""


class JobsIndex:
    """The jobs' records and the columns lists filter on, in SQLite or PostgreSQL."""

    def __init__(self, target: Path | str) -> None:
        """`target`: a SQLite file, or a `postgresql://` URL."""
        self.target = target
        self._writer: sql.Database | None = sql.open_database(target)
        self._writing = threading.Lock()  # one batch at a time on the writer's connection
        self._readers: queue.SimpleQueue[sql.Database] = queue.SimpleQueue()  # idle connections of readers
        sql.migrate(self._writer, "jobs_index_schema", MIGRATIONS)
        self._writer.execute("INSERT INTO jobs_index_keys (name, secret) VALUES ('page_token', ?) "
                             "ON CONFLICT (name) DO NOTHING", [secrets.token_hex(32)])
        secret = self._writer.execute("SELECT secret FROM jobs_index_keys WHERE name = 'page_token'").fetchone()[0]
        self._token_key = bytes.fromhex(secret)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobsIndex:
        return cls(settings.index_url or settings.index)

    # --- the fold ----------------------------------------------------------------------------------------------

    def apply(self, batch: Sequence[tuple[int, JobEvent]]) -> int:
        """Fold a batch of (stream sequence, job event) into the index, in one transaction with the sequence it
        has read up to; return that sequence (another gateway's, if it has read further). The events of a batch
        may come in any order; an event applied already changes nothing."""
        events = sorted(batch, key=lambda item: item[0])
        with self._writing:
            db = self._writer or sql.open_database(self.target)
            self._writer = db
            try:
                with db.locked(_WRITE_LOCK):
                    self._fold(db, events)
                    if events:
                        last = events[-1][0]
                        db.execute("UPDATE jobs_index_position SET last_seq = ? WHERE id = 1 AND last_seq < ?",
                                   [last, last])
                    return db.execute("SELECT last_seq FROM jobs_index_position WHERE id = 1").fetchone()[0]
            except Exception:
                # a connection that failed (a PostgreSQL restart, say) is opened again for the next batch
                self._writer = None
                with contextlib.suppress(Exception):
                    db.close()
                raise

    def _fold(self, db: sql.Database, events: list[tuple[int, JobEvent]]) -> None:
        """Each job read once, its events folded in stream order, written once."""
        rows = self._current(db, {event.data.job_id for _, event in events})
        labelled = {job_id for job_id, (_, record) in rows.items() if record.get("spec") is not None}
        changed: set[str] = set()
        for seq, event in events:
            job_id = event.data.job_id
            seq_before, record = rows.get(job_id, (0, None))
            folded = apply_event(record, event, seq)  # None: the record holds this event already
            if folded is not None:
                rows[job_id] = (max(seq_before, seq), folded)
                changed.add(job_id)
        ordered = sorted(changed)  # rows written in one order by every gateway
        db.executemany(_UPSERT_ROW, [_columns(job_id, *rows[job_id]) for job_id in ordered])
        db.executemany(_UPSERT_RECORD, [(job_id, orjson.dumps(rows[job_id][1]).decode()) for job_id in ordered])
        labels = [(job_id, key, value) for job_id in ordered if job_id not in labelled
                  for key, value in ((rows[job_id][1].get("spec") or {}).get("labels") or {}).items()]
        db.executemany("INSERT INTO job_labels (job_id, label_key, label_value) VALUES (?, ?, ?) "
                       "ON CONFLICT (job_id, label_key) DO NOTHING", labels)

    @staticmethod
    def _current(db: sql.Database, job_ids: set[str]) -> dict[str, tuple[int, dict]]:
        rows: dict[str, tuple[int, dict]] = {}
        ids = sorted(job_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            cursor = db.execute(f"SELECT j.job_id, j.seq, r.record FROM jobs j JOIN job_records r ON r.job_id = "
                                f"j.job_id WHERE j.job_id IN ({', '.join('?' * len(chunk))})", chunk)
            rows.update((job_id, (seq, orjson.loads(record))) for job_id, seq, record in cursor.fetchall())
        return rows

    def last_seq(self) -> int:
        """The stream sequence up to which the index holds every job event."""
        with self._reader() as db:
            return db.execute("SELECT last_seq FROM jobs_index_position WHERE id = 1").fetchone()[0]

    # --- the queries -------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict | None:
        """The job's record (as `jobs.get` answers it, JSON-ready), or None."""
        with self._reader() as db:
            row = db.execute("SELECT record FROM job_records WHERE job_id = ?", [job_id]).fetchone()
        return orjson.loads(row[0]) if row else None

    def page(self, tenant: str | None = None, state: str | Iterable[str] | None = None, site: str | None = None,
             since: datetime | None = None, name_prefix: str | None = None,
             tag: tuple[str, str | None] | None = None, limit: int = 50,
             page_token: str | None = None) -> tuple[list[dict], str | None]:
        """A page of job records, newest submitted first, and the token of the next page (None on the last).

        Every filter given must hold: `state` one state or several, `since` submitted at or after, `tag` a label
        (key, value), or (key, None) for any value. `page_token` is what the previous page of the same query
        gave: any other raises BadPageToken."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1 to {MAX_PAGE}, not {limit}")
        states = sorted({JobState(s).value for s in ([state] if isinstance(state, str) else state or ())})
        query = orjson.dumps([tenant, states, site, sql.iso(since) if since else None, name_prefix or None,
                              list(tag) if tag else None])
        position = self._position(page_token, query) if page_token is not None else None
        with self._reader() as db:
            where, args = _filters(db, tenant, states, site, since, name_prefix, tag)
            if position is not None:
                where.append("(submitted, job_id) < (?, ?)")  # a range of each index: a deep page costs as the first
                args += position
            rows = db.execute(
                "SELECT p.submitted, p.job_id, r.record FROM (SELECT submitted, job_id FROM jobs "
                f"WHERE {' AND '.join(where) or '1 = 1'} ORDER BY submitted DESC, job_id DESC LIMIT ?) p "
                "JOIN job_records r ON r.job_id = p.job_id ORDER BY p.submitted DESC, p.job_id DESC",
                [*args, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        token = self._token(query, rows[-1][0], rows[-1][1]) if more else None
        return [orjson.loads(record) for _, _, record in rows], token

    def _token(self, query: bytes, submitted: str, job_id: str) -> str:
        """Where the next page starts, signed with the query it belongs to: url-safe, opaque to clients."""
        body = orjson.dumps([submitted, job_id])
        tag = hmac.new(self._token_key, query + body, hashlib.sha256).digest()[:_TAG_BYTES]
        return base64.urlsafe_b64encode(tag + body).rstrip(b"=").decode()

    def _position(self, token: str, query: bytes) -> list[str]:
        if len(token) > 1024:
            raise BadPageToken("the page token is not one this index gave")
        try:
            raw = base64.b64decode(token.encode("ascii") + b"=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (ValueError, binascii.Error):
            raise BadPageToken("the page token is not one this index gave") from None
        tag, body = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        expected = hmac.new(self._token_key, query + body, hashlib.sha256).digest()[:_TAG_BYTES]
        if not hmac.compare_digest(tag, expected):
            raise BadPageToken("the page token is not one this index gave for this query")
        return orjson.loads(body)  # [submitted, job_id] of the last row given

    # --- connections -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sql.Database]:
        """A connection of its own for each reader at a time (SQLite's WAL lets them read while a batch is
        written), kept for the next one; one that failed is dropped."""
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            db = sql.open_database(self.target)
        try:
            yield db
        except BaseException:
            db.close()
            raise
        self._readers.put(db)

    def close(self) -> None:
        with self._writing:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                return


def _columns(job_id: str, seq: int, record: dict) -> tuple:
    history = record["history"]
    times = [datetime.fromisoformat(h["time"]) for h in history]
    accepted = [t for h, t in zip(history, times, strict=True) if h["state"] == JobState.accepted]
    spec = record.get("spec") or {}
    # history is in stream order: its last entry is the newest event
    return (job_id, record["tenant"], record["state"], record.get("site"), spec.get("name") or "",
            sql.iso(min(accepted or times)), sql.iso(times[-1]), seq)


def _filters(db: sql.Database, tenant: str | None, states: list[str], site: str | None, since: datetime | None,
             name_prefix: str | None, tag: tuple[str, str | None] | None) -> tuple[list[str], list]:
    where: list[str] = []
    args: list = []
    for column, value in (("tenant", tenant), ("site", site)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        args += states
    if since is not None:
        where.append("submitted >= ?")
        args.append(sql.iso(since))
    if name_prefix:
        beyond = _after_prefix(name_prefix)
        named = "name >= ?" + (" AND name < ?" if beyond is not None else "")
        named_args = [name_prefix] + ([beyond] if beyond is not None else [])
        if _few(db, f"SELECT 1 FROM jobs WHERE {named}", named_args):
            where.append(named)
            args += named_args
        else:  # a test no index serves: the jobs are walked newest first
            where.append("substr(name, 1, ?) = ?")
            args += [len(name_prefix), name_prefix]
    if tag is not None:
        key, value = tag
        pair = "label_key = ?" + (" AND label_value = ?" if value is not None else "")
        pair_args = [key] if value is None else [key, value]
        if _few(db, f"SELECT job_id FROM job_labels WHERE {pair}", pair_args):
            where.append(f"job_id IN (SELECT job_id FROM job_labels WHERE {pair})")
        else:
            where.append(f"EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = jobs.job_id AND {pair})")
        args += pair_args
    return where, args


def _few(db: sql.Database, matches: str, args: list) -> bool:
    """Whether a filter matches fewer than _FEW jobs: then its own index finds them and a sort of them is quick;
    else the jobs are walked newest first, and a page's are near the top. Neither is quick for both (a sort of
    25,000 names; a walk through 100,000 jobs for a label none has), and neither database can tell which a
    value needs (PostgreSQL knows the common values; SQLite, without statistics, none)."""
    return db.execute(f"SELECT COUNT(*) FROM ({matches} LIMIT {_FEW}) few", args).fetchone()[0] < _FEW


def _after_prefix(prefix: str) -> str | None:
    """The first string after every string that starts with `prefix`, in code point order (UTF-8's byte order);
    None if there is none."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if last <= 0x10FFFF:
            return prefix[:-1] + chr(0xE000 if 0xD800 <= last < 0xE000 else last)  # no surrogate in UTF-8
        prefix = prefix[:-1]
    return None


class Follower:
    """Keeps an index following the stream's job events: from the index's `last_seq` + 1, a batch at a time (one
    transaction each, in a thread), then live. It reads with an ephemeral pull consumer of its own, in order:
    one that loses its place (a gap in its sequence, a server restart) is made again from where the index
    stands.

        follower = Follower(bus, index).start()   # once the bus is connected
        await follower.wait_for(seq, timeout=2.0)  # read-your-writes: the index holds event `seq`
        await follower.stop()                      # then index.close()
    """

    def __init__(self, source: Bus | JetStreamContext, index: JobsIndex, subjects: Subjects | None = None, *,
                 batch: int = 256, idle_s: float = 1.0) -> None:
        """`source`: a bus, or a JetStream context with the `subjects` of its deployment."""
        self.source, self.index, self.batch, self.idle_s = source, index, batch, idle_s
        self.subjects = subjects or (source.subjects if isinstance(source, Bus) else Subjects())
        self.topology = Topology(self.subjects)
        self._read_to = 0  # the stream sequence read (and applied) up to: where a new consumer starts after
        self._caught_up = 0  # the same, or the stream's head once nothing more was found to read
        self._moved = asyncio.Event()  # set, and replaced, whenever `caught_up_to` moves on
        self._waiting = 0
        self._consumer: str | None = None  # the name of the consumer it reads with, while it has one
        self._task: asyncio.Task | None = None

    @property
    def caught_up_to(self) -> int:
        """The stream sequence up to which the index holds every job event (0 before the follower started)."""
        return self._caught_up

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """Wait until the index holds every job event up to stream sequence `seq`; False if it did not within
        `timeout` seconds."""
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                while self._caught_up < seq:
                    await self._moved.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    async def sync(self, timeout: float) -> bool:
        """Wait until the index holds every job event the stream holds now (before a list that must show what
        a request just did); False if it did not within `timeout` seconds, or the stream cannot be read.

        The stream's last events may be no job's (a site's, a bill): the consumer then says it has nothing
        more for the index, at once, rather than the follower's next idle fetch."""
        try:
            async with asyncio.timeout(timeout):
                head = await self._head()
                self._waiting += 1
                try:
                    while self._caught_up < head:
                        moved = self._moved
                        if await self._delivered_all():
                            self._advance(head)
                        else:
                            await moved.wait()
                finally:
                    self._waiting -= 1
            return True
        except TimeoutError:
            return False
        except Exception as e:  # the server away: the caller's list is late rather than wrong
            log.warning("index.sync_failed", reason=repr(e))
            return False

    async def _delivered_all(self) -> bool:
        """Whether the follower's consumer has no job event left to deliver and the index holds all it delivered
        (asked after the stream's head was read: every job event up to it is then in the index)."""
        if self._consumer is None:
            return False
        try:
            info = await self._js.consumer_info(self.topology.events_stream, self._consumer)
        except Exception:  # being made again: the follower's progress says when
            return False
        return info.num_pending == 0 and self._read_to >= (info.delivered.stream_seq or 0)

    def start(self) -> Follower:
        self._task = asyncio.create_task(self.run(), name="jobs-index-follower")
        return self

    async def stop(self) -> None:
        """Stop following; a batch being written is finished first."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Follow until cancelled; a failure (the server away, the database down) is logged and tried again, less
        and less often."""
        self._read_to = await asyncio.to_thread(self.index.last_seq)
        self._advance(self._read_to)
        log.info("index.following", after_seq=self._read_to)
        failures = 0
        while True:
            try:
                await self._follow()
                failures = 0  # it lost its place: made again at once
            except Exception as e:
                failures += 1
                log.warning("index.follow_failed", tries=failures, after_seq=self._read_to, reason=repr(e))
                await asyncio.sleep(min(5.0, 0.05 * 2 ** failures))

    @property
    def _js(self) -> JetStreamContext:
        return self.source.js if isinstance(self.source, Bus) else self.source

    async def _head(self) -> int:
        return (await self._js.stream_info(self.topology.events_stream)).state.last_seq

    async def _follow(self) -> None:
        """Read with a new consumer from what the index holds until it loses its place (then return) or fails."""
        js, stream, name = self._js, self.topology.events_stream, f"jobs-index-{uuid.uuid4().hex}"
        await js.add_consumer(stream, ConsumerConfig(
            name=name, filter_subject=self.subjects.job_events_all, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._read_to + 1, ack_policy=AckPolicy.NONE, mem_storage=True,
            inactive_threshold=60.0))  # gone a minute after its gateway
        sub = await js.pull_subscribe_bind(stream=stream, name=name)
        self._consumer = name
        try:
            delivered = 0  # the consumer's sequence: one more for each message, or a message was lost
            near_head = True
            while True:
                # the stream's last sequence, read before a fetch that then finds nothing more to deliver: every
                # job event up to it is in the index, whatever non-job events came after the last job event
                head = await self._head() if near_head else None
                try:
                    msgs = await sub.fetch(self.batch, timeout=self.idle_s if not self._waiting else 0.1)
                    idle = False
                except TimeoutError:  # nats-py's own, or asyncio's from inside fetch
                    msgs, idle = [], True
                if any(m.metadata.sequence.consumer != delivered + i for i, m in enumerate(msgs, start=1)):
                    log.warning("index.gap", after_seq=self._read_to)
                    return
                delivered += len(msgs)
                if msgs:
                    applied = await self._apply(msgs)
                    self._read_to = max(self._read_to, applied, msgs[-1].metadata.sequence.stream)
                    self._advance(self._read_to)
                # (an empty answer without a timeout may be the consumer gone: it proves nothing)
                drained = idle or (bool(msgs) and msgs[-1].metadata.num_pending == 0)
                if head is not None and drained:
                    self._advance(head)
                near_head = drained or not msgs
        finally:
            self._consumer = None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):  # else its inactivity removes it
                await js.delete_consumer(stream, name)

    async def _apply(self, msgs: list) -> int:
        """Apply the batch in a thread; if the follower is stopped meanwhile, the batch is finished first (the
        index may be closed right after)."""
        events = []
        for msg in msgs:
            try:
                events.append((msg.metadata.sequence.stream, JobEvent.model_validate_json(msg.data)))
            except ValidationError as e:  # not a job event: nothing to index, and it never will be
                log.warning("index.event_skipped", subject=msg.subject, seq=msg.metadata.sequence.stream,
                            reason=str(e)[:500])
        writing = asyncio.ensure_future(asyncio.to_thread(self.index.apply, events))
        try:
            return await asyncio.shield(writing)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._read_to = max(self._read_to, await writing)
            raise

    def _advance(self, seq: int) -> None:
        if seq > self._caught_up:
            self._caught_up = seq
            self._moved.set()
            self._moved = asyncio.Event()


async def follow(bus_or_js: Bus | JetStreamContext, index: JobsIndex, subjects: Subjects | None = None, *,
                 batch: int = 256, idle_s: float = 1.0) -> None:
    """Follow the stream into the index until cancelled: `Follower(...).run()`, for a caller that needs neither
    its progress nor `wait_for`."""
    await Follower(bus_or_js, index, subjects, batch=batch, idle_s=idle_s).run()
