"""JetStream streams, key-value buckets and durable consumer names, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.js.api import ConsumerConfig, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import KV_STREAM_TEMPLATE

from .subjects import Subjects

# How long JetStream remembers a Nats-Msg-Id: a step redone after a crash within this window is dropped.
DEDUPE_WINDOW_S = 15 * 60
# How long a consumer waits for an ack before redelivering: what a crashed replica costs in latency.
ACK_WAIT_S = 10.0
# The copies of each stream and bucket on a cluster of three servers or more: a write is acknowledged once two hold
# it, so one server may be lost (killed, restarted, upgraded) and nothing acknowledged is; five would survive two.
CLUSTER_REPLICAS = 3


def consumer_config(**overrides: Any) -> ConsumerConfig:
    return ConsumerConfig(ack_wait=ACK_WAIT_S, **overrides)


@dataclass(frozen=True)
class Topology:
    subjects: Subjects

    @property
    def _p(self) -> str:
        return self.subjects.prefix.upper().replace("-", "_")

    # streams
    @property
    def events_stream(self) -> str:
        return f"{self._p}_EVENTS"

    @property
    def intake_stream(self) -> str:
        return f"{self._p}_INTAKE"

    @property
    def dispatch_stream(self) -> str:
        return f"{self._p}_DISPATCH"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self._p}_DLQ"

    @property
    def reports_stream(self) -> str:
        """Sites' reports on their jobs, until routing has checked them and made them events."""
        return f"{self._p}_REPORTS"

    # key-value buckets
    @property
    def jobs_bucket(self) -> str:
        return f"{self.subjects.prefix}_jobs"

    @property
    def idempotency_bucket(self) -> str:
        return f"{self.subjects.prefix}_idempotency"

    @property
    def sites_bucket(self) -> str:
        return f"{self.subjects.prefix}_sites"

    @property
    def reservations_bucket(self) -> str:
        return f"{self.subjects.prefix}_reservations"

    @property
    def budgets_bucket(self) -> str:
        """Per tenant, what billing has metered: euros this month, allocation hours in all."""
        return f"{self.subjects.prefix}_budgets"

    @property
    def waiting_bucket(self) -> str:
        """Jobs waiting for placement, with their priority: a job yields GPUs to a higher priority."""
        return f"{self.subjects.prefix}_waiting"

    @property
    def buckets(self) -> tuple[str, ...]:
        return (self.jobs_bucket, self.idempotency_bucket, self.sites_bucket, self.reservations_bucket,
                self.budgets_bucket, self.waiting_bucket)

    def bucket_stream(self, bucket: str) -> str:
        """The stream JetStream keeps a key-value bucket in."""
        return KV_STREAM_TEMPLATE.format(bucket=bucket)

    def bucket_config(self, bucket: str, replicas: int = 1) -> KeyValueConfig:
        # direct gets: a read is the value itself, not a base64 field of a JSON reply
        return KeyValueConfig(bucket=bucket, storage=StorageType.FILE, history=1, direct=True, replicas=replicas)

    def stream_configs(self, replicas: int = 1) -> list[StreamConfig]:
        """Every stream, each kept on `replicas` servers (CONTINUUM_STREAM_REPLICAS, Bus.replicas)."""
        s = self.subjects
        dedupe = float(DEDUPE_WINDOW_S)
        return [
            StreamConfig(name=self.events_stream, subjects=[s.events_all], storage=StorageType.FILE,
                         duplicate_window=dedupe, num_replicas=replicas),
            StreamConfig(name=self.intake_stream, subjects=[s.intake(">")], storage=StorageType.FILE,
                         retention=RetentionPolicy.WORK_QUEUE, duplicate_window=dedupe, num_replicas=replicas),
            StreamConfig(name=self.dispatch_stream, subjects=[f"{s.prefix}.dispatch.>"], storage=StorageType.FILE,
                         retention=RetentionPolicy.WORK_QUEUE, duplicate_window=dedupe, num_replicas=replicas),
            StreamConfig(name=self.dead_letter_stream, subjects=[s.dead_letter(">")], storage=StorageType.FILE,
                         num_replicas=replicas),
            # no message ids here (Bus.publish_report): no duplicate window either
            StreamConfig(name=self.reports_stream, subjects=[s.report("*")], storage=StorageType.FILE,
                         retention=RetentionPolicy.WORK_QUEUE, num_replicas=replicas),
        ]

    def durable(self, service: str, role: str) -> str:
        return f"{self.subjects.prefix}-{service}-{role}"

    def site_orders(self, site: str) -> list[tuple[str, str, ConsumerConfig]]:
        """A site agent's consumers of the dispatch stream, as (durable, subject, config): its dispatch orders and
        its stop orders. Declared by the services (a site's principal may use them, not make them)."""
        return [(self.durable("agent", f"{site}-run"), self.subjects.dispatch(site), consumer_config()),
                (self.durable("agent", f"{site}-cancel"), self.subjects.stop(site), consumer_config())]

    def site_durables(self, site: str) -> list[str]:
        return [durable for durable, _, _ in self.site_orders(site)]
