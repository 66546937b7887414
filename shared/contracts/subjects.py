"""Every subject of the system, built from one prefix. No subject string is written anywhere else."""

from __future__ import annotations

from dataclasses import dataclass


def inbox_prefix(principal: str) -> str:
    """Where replies to a principal's requests and its JetStream fetches come: each its own, so that a site's
    permission to receive its replies is not one to read every reply in the services' account."""
    return f"_INBOX_{principal}"


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

    @property
    def jobs_history(self) -> str:
        """A page of job and billing events from the event stream (a tenant's own, for a tenant)."""
        return f"{self.prefix}.jobs.history"

    @staticmethod
    def on_behalf_of(request_subject: str, served: str) -> str | None:
        """The tenant a request came from, when it came on `<served>.<tenant>`: the subject a tenant's account
        reaches the services by, with its name put there by the server (docs/security.md); None for the plain
        subject (the operator, the services, an open server)."""
        return request_subject[len(served) + 1:] if request_subject.startswith(served + ".") else None

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

    def tenant_events(self, tenant: str = "*") -> tuple[str, str]:
        """Every job and billing event of a tenant."""
        return f"{self.prefix}.events.job.{tenant}.>", f"{self.prefix}.events.billing.{tenant}.>"

    @property
    def site_events_all(self) -> str:
        return f"{self.prefix}.events.site.>"

    # routing -> agents (JetStream)
    def dispatch(self, site: str = "*") -> str:
        return f"{self.prefix}.dispatch.{site}.run"

    def stop(self, site: str = "*") -> str:
        return f"{self.prefix}.dispatch.{site}.cancel"

    # agents -> routing, which makes the reports of jobs dispatched there contract events (JetStream)
    def report(self, site: str = "*") -> str:
        """A site's reports: `<prefix>.reports.<site>.<tenant>.<job_id>.<kind>`, those tokens and no others."""
        return f"{self.prefix}.reports.{site}.*.*.*"

    def job_report(self, site: str, tenant: str, job_id: str, kind: str) -> str:
        return f"{self.prefix}.reports.{site}.{tenant}.{job_id}.{kind}"

    def report_of(self, subject: str) -> tuple[str, str, str, str] | None:
        """(site, tenant, job_id, kind) of a report's subject; None for any other shape."""
        tokens = subject.split(".")
        head = [*self.prefix.split("."), "reports"]
        if len(tokens) != len(head) + 4 or tokens[:len(head)] != head:
            return None
        site, tenant, job_id, kind = tokens[len(head):]
        return site, tenant, job_id, kind

    # agents -> intake: the record of a job dispatched to the site (core NATS request/reply)
    def site_job(self, site: str = "*") -> str:
        return f"{self.prefix}.agents.{site}.job"

    # agents -> capacity (core NATS: a lost heartbeat is replaced by the next one)
    def heartbeat(self, site: str = "*") -> str:
        return f"{self.prefix}.heartbeat.{site}"

    # messages that kept failing, with the reason (JetStream)
    def dead_letter(self, service: str = "*") -> str:
        return f"{self.prefix}.dlq.{service}"
