"""Every subject of the system, built from one prefix. No subject string is written anywhere else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Subjects:
    prefix: str = "continuum"

    # requests (core NATS request/reply, queue groups)
    @property
    def jobs_submit(self) -> str:
        return f"{self.prefix}.jobs.submit"

    @property
    def jobs_get(self) -> str:
        return f"{self.prefix}.jobs.get"

    @property
    def jobs_cancel(self) -> str:
        return f"{self.prefix}.jobs.cancel"

    @property
    def sites_list(self) -> str:
        return f"{self.prefix}.sites.list"

    @property
    def routing_overflow(self) -> str:
        return f"{self.prefix}.routing.overflow"

    @property
    def billing_statement(self) -> str:
        return f"{self.prefix}.billing.statement"

    @property
    def billing_topup(self) -> str:
        return f"{self.prefix}.billing.topup"

    # fire-and-forget intake (JetStream)
    def intake(self, tenant: str = "*") -> str:
        return f"{self.prefix}.intake.{tenant}"

    # events (JetStream stream CONTINUUM_EVENTS)
    @property
    def events_all(self) -> str:
        return f"{self.prefix}.events.>"

    @property
    def job_events_all(self) -> str:
        return f"{self.prefix}.events.job.>"

    def job_event(self, tenant: str = "*", job_id: str = "*", kind: str = "*") -> str:
        return f"{self.prefix}.events.job.{tenant}.{job_id}.{kind}"

    def site_event(self, site: str = "*", kind: str = "*") -> str:
        return f"{self.prefix}.events.site.{site}.{kind}"

    def billing_event(self, tenant: str = "*", kind: str = "*") -> str:
        return f"{self.prefix}.events.billing.{tenant}.{kind}"

    # routing -> agents (JetStream)
    def dispatch(self, site: str = "*") -> str:
        return f"{self.prefix}.dispatch.{site}.run"

    def stop(self, site: str = "*") -> str:
        return f"{self.prefix}.dispatch.{site}.cancel"

    # agents -> capacity (core NATS: a lost heartbeat is replaced by the next one)
    def heartbeat(self, site: str = "*") -> str:
        return f"{self.prefix}.heartbeat.{site}"

    # messages that kept failing, with the reason (JetStream)
    def dead_letter(self, service: str = "*") -> str:
        return f"{self.prefix}.dlq.{service}"
