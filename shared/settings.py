"""Configuration: one pydantic-settings model, read from CONTINUUM_* variables and validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONTINUUM_", extra="forbid")

    nats_url: str | None = Field(None, description="CONTINUUM_NATS_URL: the NATS server (a comma-separated list for "
                                 "a cluster); unset, `up` starts one")
    nats_creds: Path | None = Field(None, description="CONTINUUM_NATS_CREDS: this process's credentials, an nkey seed "
                                    "(`<principal>.nk`) or a NATS .creds file, named after its principal; unset, "
                                    "none (an open server)")
    nats_ca: Path | None = Field(None, description="CONTINUUM_NATS_CA: the CA that signed the server's TLS "
                                 "certificate; unset, the system's (for a tls:// url)")
    stream_replicas: int | None = Field(None, ge=1, le=5, description="CONTINUUM_STREAM_REPLICAS: the copies "
                                        "JetStream keeps of every stream and bucket (at most 5, JetStream's limit); "
                                        "unset, 1 on a server alone and 3 when the server reports a cluster of three "
                                        "or more (shared/bus.py, replicas_for)")
    prefix: str = Field("continuum", pattern=r"^[a-z][a-z0-9-]*$", description="CONTINUUM_PREFIX: subject prefix")
    data_dir: Path = Field(Path(".continuum"), description="CONTINUUM_DATA_DIR: NATS store, ledger, state file")
    sites_file: Path | None = Field(None, description="CONTINUUM_SITES_FILE: sites catalog; unset, the demo's")
    tenants_file: Path | None = Field(None, description="CONTINUUM_TENANTS_FILE: tenants catalog; unset, the demo's")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="CONTINUUM_HEARTBEAT_INTERVAL_S")
    max_deliveries: int = Field(5, ge=1, description="CONTINUUM_MAX_DELIVERIES: tries before dead-lettering")
    retry_backoff_s: float = Field(0.5, ge=0, description="CONTINUUM_RETRY_BACKOFF_S: first retry delay, doubled "
                                   "each try")
    placement_retry_s: float = Field(1.0, gt=0, description="CONTINUUM_PLACEMENT_RETRY_S: how often a waiting job is "
                                     "tried again")
    lost_job_grace_s: float = Field(120.0, ge=0, description="CONTINUUM_LOST_JOB_GRACE_S: how long jobs running at a "
                                    "site that went down wait for it before they are requeued elsewhere")
    max_request_bytes: int = Field(64 * 1024, gt=0, description="CONTINUUM_MAX_REQUEST_BYTES: largest JobSpec accepted")
    ledger_path: Path | None = Field(None, description="CONTINUUM_LEDGER_PATH: SQLite ledger; unset, "
                                     "DATA_DIR/ledger.sqlite3")
    ledger_url: str | None = Field(None, pattern=r"^postgres(ql)?://", description="CONTINUUM_LEDGER_URL: a "
                                   "PostgreSQL ledger (postgresql://...); unset, the SQLite file")
    http_port: int | None = Field(None, ge=0, le=65535, description="CONTINUUM_HTTP_PORT: the HTTP gateway's port "
                                  "(TES, REST, dashboard); unset, a free one (`up` writes it to the state file)")
    http_host: str = Field("127.0.0.1", description="CONTINUUM_HTTP_HOST: the address the gateway listens on "
                           "(0.0.0.0 in a container)")
    tokens_dir: Path | None = Field(None, description="CONTINUUM_TOKENS_DIR: the HTTP API's bearer tokens (`auth "
                                    "init`'s DIR/tokens); unset, those beside this process's credentials, and "
                                    "without credentials an open API")
    jaeger_url: str | None = Field(None, pattern=r"^https?://", description="CONTINUUM_JAEGER_URL: a Jaeger UI "
                                   "the dashboard links each job's trace to; unset, no link")
    index_path: Path | None = Field(None, description="CONTINUUM_INDEX_PATH: the gateway's SQLite index of jobs "
                                    "(the read model of lists); unset, DATA_DIR/jobs-index.sqlite3")
    index_url: str | None = Field(None, pattern=r"^postgres(ql)?://", description="CONTINUUM_INDEX_URL: a "
                                  "PostgreSQL index of jobs shared by every gateway; unset, the SQLite file")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="CONTINUUM_METRICS_PORT: this service's "
                                     "Prometheus endpoint (http://HOST:PORT/metrics); unset, none (`up` gives "
                                     "each service one)")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="CONTINUUM_LOG_FORMAT")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="CONTINUUM_LOG_LEVEL")
    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="CONTINUUM_EVENT_LOOP: uvloop (libuv: "
                                                      "less CPU for each message) or Python's own asyncio loop")

    @property
    def principal(self) -> str | None:
        """Who this process is on the bus (`services`, `operator`, `site-<id>`, `tenant-<id>`), from its
        credentials file's name; None without credentials."""
        return self.nats_creds.stem if self.nats_creds else None

    @property
    def state_file(self) -> Path:
        return self.data_dir / "state.json"

    @property
    def ledger(self) -> Path:
        return self.ledger_path or self.data_dir / "ledger.sqlite3"

    @property
    def index(self) -> Path:
        return self.index_path or self.data_dir / "jobs-index.sqlite3"


class SettingsError(ValueError):
    pass


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad value names its variable."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = [f"CONTINUUM_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in e.errors()]
        raise SettingsError("; ".join(problems)) from e
