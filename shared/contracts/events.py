"""The CloudEvents 1.0 envelope (structured JSON mode) that every event on the bus travels in.

Event ids are derived from what the event says happened (job, kind, attempt), not drawn at random: a
service that redoes a step after a crash publishes the same id again, JetStream drops the copy (it is also
the `Nats-Msg-Id`), and the registry ignores an id it has applied already.

The envelope is generic in its `data`: a plain dict here, the contract's model in the typed envelopes of each
area (`JobEvent`, `SiteEvent`, `UsageEvent`, `BudgetEvent`). A consumer that names a typed envelope has the
bus validate the data once, as it comes in, and reads fields after that, not keys.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Self

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeVar

_NAMESPACE = uuid.UUID("6f1c1d2e-5b8a-4c3e-9a57-2f0c6f4b9e11")


def event_id(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts)))


def utcnow() -> datetime:
    return datetime.now(UTC)


# the data of an envelope that does not say: the JSON object as it is
DataT = TypeVar("DataT", default=dict[str, Any])


class CloudEvent(BaseModel, Generic[DataT]):
    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    subject: str
    time: datetime = Field(default_factory=utcnow)
    datacontenttype: Literal["application/json"] = "application/json"
    data: DataT

    @property
    def kind(self) -> str:
        return self.type.rsplit(".", 1)[-1]

    @classmethod
    def make(cls, service: str, area: str, kind: str, subject: str, data: DataT, *id_parts: object,
             time: datetime | None = None) -> Self:
        """An event of `continuum.<area>.<kind>` about `subject`; `id_parts` make its deterministic id."""
        return cls(
            id=event_id(area, subject, kind, *id_parts),
            source=f"continuum/{service}",
            type=f"continuum.{area}.{kind}",
            subject=subject,
            time=time or utcnow(),
            data=data,
        )

