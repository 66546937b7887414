"""The `continuum` command: run the system (up, service, demo) and use it (submit, status, cancel, watch,
sites, bill). Every user command talks to the system only through the public contract."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import yaml
from rich.console import Console
from rich.table import Table

from shared.bus import connect, request_json
from shared.contracts.catalog import Catalog, CatalogError
from shared.contracts.subjects import Subjects
from shared.settings import Settings, SettingsError, load_settings

app = typer.Typer(help="Continuum: one broker for Europe's public supercomputers and sovereign GPU clouds.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)
auth_app = typer.Typer(help="Principals and credentials: who may do what on the bus.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")

# who the commands act as (global options, given before or after the command): see `main`
_who: dict[str, Any] = {}


@app.callback()
def _principal(
        creds: Annotated[Path | None, typer.Option("--creds", help="act with these credentials (a principal's .nk "
                                                                  "or .creds file; or CONTINUUM_NATS_CREDS)")] = None,
        ca: Annotated[Path | None, typer.Option("--ca", help="the CA of the server's TLS certificate (or "
                                                            "CONTINUUM_NATS_CA)")] = None,
        as_tenant: Annotated[str | None, typer.Option("--as", help="act as this tenant, with the credentials "
                                                                   "`continuum up` keeps (default: the operator)")]
        = None) -> None:
    _who.update(creds=creds, ca=ca, tenant=as_tenant)


GLOBAL_OPTIONS = ("--creds", "--ca", "--as")
# how long `up` and `wait-ready` wait for every service to answer ready (seconds), and what `up --detach` adds
# for what comes before the services: the credentials and the server
READY_TIMEOUT_S = 120.0
DETACH_SLACK_S = 60.0


SitesOpt = Annotated[Path | None, typer.Option("--sites", help="sites catalog (YAML); default: the demo's")]
# the replay's default date for a trace's time 0 (a date: typer parses it naive, the replay makes it UTC)
REPLAY_START = datetime(2022, 3, 1)  # noqa: DTZ001
TenantsOpt = Annotated[Path | None, typer.Option("--tenants", help="tenants catalog (YAML); default: the demo's")]


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as e:
        err.print(f"[red]bad configuration:[/] {e}")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _check_catalog(settings: Settings) -> Catalog:
    from shared.carbon import check_zones, default_carbon

    try:
        catalog = Catalog.load(settings.sites_file, settings.tenants_file)
        check_zones(catalog, default_carbon().zones)
    except CatalogError as e:
        raise _fail(str(e), 2) from None
    return catalog


def _client() -> Settings:
    """How to reach the running system, and as whom: `--creds`, else `--as TENANT` or the operator from the
    credentials `continuum up` keeps (none on an open server)."""
    from services.auth import tenant_principal
    from services.runtime import reach_running

    settings = _settings(nats_creds=_who.get("creds"), nats_ca=_who.get("ca"))
    tenant = _who.get("tenant")
    try:
        client = reach_running(settings, tenant_principal(tenant) if tenant else None)
    except RuntimeError as e:
        raise _fail(str(e)) from None
    if tenant and client.principal != tenant_principal(tenant):
        raise _fail(f"--as {tenant}: the running system keeps no credentials for it (an open server, or "
                    "CONTINUUM_NATS_URL set): give its own with --creds", 2)
    return client


async def _connection_error(e: Exception) -> None:
    """nats-py's report of a connection's trouble. A server of CONTINUUM_NATS_URL's list that does not answer is
    passed over for the next (and if none answers, connecting fails with its own message): nothing to say. Anything
    else (a permission the server refused) is said in one line, not as nats-py's traceback."""
    if not isinstance(e, OSError):
        err.print(f"[yellow]nats:[/] {e}")


async def _connect(settings: Settings, **options: Any):
    try:
        return await connect(settings, connect_timeout=3, error_cb=_connection_error, **options)
    except Exception as e:
        raise _fail(f"cannot reach the system at {settings.nats_url}: {e}") from None


async def _request(subject_of, body: Any, timeout: float = 5.0) -> dict:
    """One request to the running system, found from CONTINUUM_NATS_URL or the state file."""
    settings = _client()
    nc = await _connect(settings, max_reconnect_attempts=1)
    try:
        return await request_json(nc, subject_of(Subjects(settings.prefix)), body, timeout)
    except RuntimeError as e:
        raise _fail(str(e)) from None
    finally:
        await nc.close()


def _ask(subject_of, body: Any) -> dict:
    """A request's reply; an error reply stops the command with its reason."""
    reply = asyncio.run(_request(subject_of, body))
    if "error" in reply:
        raise _fail(reply["error"])
    return reply


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    return table


@app.command()
def up(sites: SitesOpt = None, tenants: TenantsOpt = None,
       remote_site: Annotated[list[str] | None, typer.Option(
           "--remote-site", help="a site whose agent runs elsewhere (`continuum service agent --site SITE` on the "
                                 "site itself); repeat for several")] = None,
       auth: Annotated[Path | None, typer.Option(
           "--auth", help="the folder `continuum auth init` wrote, for an external server run with its nats.conf "
                          "(CONTINUUM_NATS_URL=tls://...); without CONTINUUM_NATS_URL, DATA_DIR/auth is made and "
                          "used")] = None,
       detach: Annotated[bool, typer.Option(
           "--detach", help="run in the background (logs in DATA_DIR/logs, `up.log` its own) and return once every "
                            "service is ready, exit 0, or it failed, non-zero with why; `continuum down` stops "
                            "it")] = False,
       timeout: Annotated[float, typer.Option(
           "--timeout", min=0, help="how long to wait for every service to be ready (seconds); not ready by then, "
                                    "`up` says which are not and why, and stops")] = READY_TIMEOUT_S) -> None:
    """Run every service and a site agent for each catalog site, until Ctrl-C (or `continuum down`); it says it
    is up once every service answers ready."""
    from services.runtime import System, describe_waiting, running_supervisor

    settings = _settings(sites_file=sites, tenants_file=tenants)
    catalog = _check_catalog(settings)
    unknown = sorted(set(remote_site or []) - set(catalog.sites))
    if unknown:
        raise _fail(f"--remote-site {', '.join(unknown)}: not in the catalog; known: {', '.join(catalog.sites)}", 2)
    if auth and not (auth / "nats.conf").is_file():
        raise _fail(f"--auth {auth}: no nats.conf there; write it with `continuum auth init --out {auth}`", 2)
    if running := running_supervisor(settings):
        raise _fail(f"a system already runs from {settings.data_dir} (`continuum up`, pid {running}): `continuum "
                    "down` stops it")
    if detach:
        args = [*(("--sites", str(sites.resolve())) if sites else ()),
                *(("--tenants", str(tenants.resolve())) if tenants else ()),
                *(arg for site in remote_site or () for arg in ("--remote-site", site)),
                *(("--auth", str(auth.resolve())) if auth else ()), "--timeout", str(timeout)]
        raise typer.Exit(_up_in_background(settings, catalog, args, timeout))
    local = [s for s in catalog.sites if s not in (remote_site or [])] if remote_site else None
    system = System(settings, agent_sites=local, auth=auth)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        url = system.start(catalog)
        console.print(f"starting on {url}: {len(catalog.sites)} sites, {len(catalog.tenants)} tenants; logs in "
                      f"{system.log_dir}")
        ready_by, announced = time.monotonic() + timeout, False
        while not stop:
            system.check()
            if not announced and system.ready:
                announced = True
                _say_up(url, system.http_url, system.auth, "Ctrl-C (or `continuum down`) stops it.")
            elif not announced and time.monotonic() >= ready_by:
                raise _fail(f"not every service was ready within {timeout:g} s:\n"
                            + describe_waiting(system.waiting, system.log_dir))
            time.sleep(0.2)
    finally:
        system.stop()
        console.print("continuum stopped")


def _say_up(url: str, http_url: str | None, auth: Path | str | None, how_to_stop: str) -> None:
    console.print(f"[bold green]continuum is up[/] on {url}: every service is ready. {how_to_stop}")
    console.print(f"HTTP (TES, REST, the dashboard): {http_url}")
    if auth:
        console.print(f"TLS and a principal for every tenant, site and the operator ({auth}); commands act as the "
                      "operator, `--as TENANT` as a tenant.")


def _up_in_background(settings: Settings, catalog: Catalog, args: list[str], timeout: float) -> int:
    """`continuum up ARGS` as a daemon (its own session: no terminal, no Ctrl-C of this one's reaches it), its
    output in DATA_DIR/logs/up.log; whether it came up (0) or not (its exit code, and what it said)."""
    from services.runtime import running_state

    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    up_log = log_dir / "up.log"
    said_from = up_log.stat().st_size if up_log.exists() else 0
    # its words are read in a file, and echoed here when it fails: not wrapped for a terminal of 80 columns
    env = {"COLUMNS": "200", **os.environ}
    with up_log.open("ab") as out:  # the daemon keeps its own copy of the handle
        daemon = subprocess.Popen([sys.executable, "-m", "services.cli", "up", *args], env=env,
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def repeat_its_words() -> None:  # as it wrote them: its lines name services and their logs
        with up_log.open("rb") as log:
            log.seek(said_from)
            sys.stderr.write(log.read().decode(errors="replace").rstrip() + "\n")

    # its own deadline is for the services once started; the server and credentials come first
    deadline = time.monotonic() + timeout + DETACH_SLACK_S
    try:
        while True:
            if (code := daemon.poll()) is not None:
                err.print(f"[red]error:[/] continuum up stopped (exit code {code}); it said ({up_log}):")
                repeat_its_words()
                return code or 1
            try:
                state = running_state(settings)
            except RuntimeError:  # not written yet
                state = {}
            if state.get("pid") == daemon.pid and state.get("ready"):
                _say_up(state["nats_url"], state.get("http"), state.get("auth"), "`continuum down` stops it.")
                console.print(f"in the background (pid {daemon.pid}): {len(catalog.sites)} sites, "
                              f"{len(catalog.tenants)} tenants; logs in {state.get('logs')}")
                return 0
            if time.monotonic() >= deadline:
                err.print(f"[red]error:[/] continuum up (pid {daemon.pid}) is not up after "
                          f"{timeout + DETACH_SLACK_S:g} s: stopped. It said ({up_log}):")
                repeat_its_words()
                raise typer.Exit(1)
            time.sleep(0.2)  # another process's progress: nothing to wait on but a new look
    except BaseException:  # not up in time, or Ctrl-C here: nothing is left running half-started
        daemon.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(30)
        raise


@app.command()
def down(timeout: Annotated[float, typer.Option("--timeout", min=0, help="how long to wait for it to stop "
                                                                         "(seconds)")] = 60.0) -> None:
    """Stop the system `continuum up` runs from this data directory (in the background or not): every service,
    and the nats-server it started; returns once its supervisor is gone."""
    from services.runtime import stop_running

    try:
        pid = stop_running(_settings(), timeout)
    except RuntimeError as e:
        raise _fail(str(e)) from None
    console.print(f"continuum stopped (it ran as pid {pid})")


@app.command("wait-ready")
def wait_ready(timeout: Annotated[float, typer.Option("--timeout", min=0, help="how long to wait (seconds)")]
               = READY_TIMEOUT_S) -> None:
    """Wait until the system `continuum up` runs from this data directory (started or starting) answers ready,
    every service of it; exit 1 saying what is not ready, and where its logs are, if it does not in time."""
    from services.runtime import wait_ready as until_ready

    try:
        state = until_ready(_settings(), timeout)
    except RuntimeError as e:
        raise _fail(str(e)) from None
    console.print(f"continuum is ready on {state['nats_url']}: {len(state['readyz'])} services")


@app.command()
def service(name: Annotated[str, typer.Argument(help="intake | capacity | routing | billing | gateway | agent")],
            site: Annotated[list[str] | None, typer.Option("--site", help="agent only: the sites to serve")] = None,
            ) -> None:
    """Run one service in this process (it finds NATS from CONTINUUM_NATS_URL or the state file)."""
    from services.runtime import SERVICES, reach_running, run_service

    if name not in SERVICES:
        raise _fail(f"no service {name!r}; one of {', '.join(SERVICES)}", 2)
    from services.auth import SERVICES_PRINCIPAL, site_principal

    settings = _settings(nats_creds=_who.get("creds"), nats_ca=_who.get("ca"))
    _check_catalog(settings)
    # beside a running `up` that keeps credentials, and none given: the services' own, or its site's for an agent
    principal = None if settings.nats_creds else site_principal(site[0]) if name == "agent" and site \
        else SERVICES_PRINCIPAL
    try:
        settings = reach_running(settings, principal)
    except RuntimeError as e:
        raise _fail(str(e), 2) from None
    who = settings.principal or ""
    if who.startswith("site-") and site != [who.removeprefix("site-")]:
        raise _fail(f"{who}'s credentials serve one site: --site {who.removeprefix('site-')}", 2)
    run_service(name, settings, site or None)


@app.command()
def submit(file: Annotated[Path, typer.Argument(help="a JobSpec, YAML or JSON", exists=True, dir_okay=False)]) -> None:
    """Submit a job; prints its id, or why it was rejected."""
    try:
        spec = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise _fail(f"{file}: not valid YAML or JSON: {e}", 2) from None
    reply = asyncio.run(_request(lambda s: s.jobs_submit, spec))
    if reply.get("state") != "accepted":
        err.print(f"[red]rejected[/] {reply.get('job_id', '')}")
        for problem in reply.get("errors", []):
            err.print(f"  {'.'.join(map(str, problem['loc'])) or '(body)'}: {problem['msg']}")
        raise typer.Exit(1)
    console.print(f"[green]accepted[/] {reply['job_id']}")


@app.command()
def status(job_id: str, as_json: Annotated[bool, typer.Option("--json", help="print the JobRecord")] = False) -> None:
    """Show a job: its state, where it runs and why, and its history."""
    record = _ask(lambda s: s.jobs_get, {"job_id": job_id})
    if as_json:
        console.print_json(data=record)
        return
    spec = record.get("spec") or {}
    console.print(f"[bold]{record['job_id']}[/] {spec.get('name', '')} tenant={record['tenant']} "
                  f"state=[bold]{record['state']}[/] site={record.get('site') or '-'}"
                  + (f" exit_code={record['exit_code']}" if record.get("exit_code") is not None else ""))
    decision = record.get("decision")
    for reason in ([] if decision else record.get("reasons") or []):
        console.print(f"  reason: {reason}")
    if decision:
        why = "waits" if record["state"] == "queued" else "cannot run"
        title = "placement" if decision.get("site") else f"why it {why}"
        table = _table(title + (" (overflow)" if decision.get("overflow") else ""),
                       ("site", "eligible", "score", "cost EUR", "CO2e kg", "reasons"))
        for c in decision["candidates"]:
            chosen = c["site"] == decision.get("site")
            table.add_row(("* " if chosen else "  ") + c["site"], "yes" if c["eligible"] else "no",
                          "" if c["score"] is None else f"{c['score']:.1f}", f"{c['parts'].get('cost_eur', 0):.2f}",
                          f"{c['parts'].get('co2e_kg', 0):.3f}", "; ".join(c["reasons"]))
        console.print(table)
    for h in record.get("history", []):
        extra = " ".join(f"{k}={h[k]}" for k in ("site", "exit_code", "reason") if h.get(k) is not None)
        console.print(f"  {h['time']}  {h['state']:<10} {extra}")


@app.command()
def cancel(job_id: str, reason: Annotated[str, typer.Option(help="why")] = "cancelled by the user") -> None:
    """Cancel a job wherever it is."""
    reply = _ask(lambda s: s.jobs_cancel, {"job_id": job_id, "reason": reason})
    console.print(f"{reply['job_id']}: {reply['state']}")


@app.command()
def sites(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The live view of every site."""
    reply = _ask(lambda s: s.sites_list, {})
    if as_json:
        console.print_json(data=reply)
        return
    table = _table("sites", ("site", "kind", "country", "state", "GPUs free/total", "queued", "est. wait",
                             "gCO2/kWh", "EUR/GPU-h"))
    for s in reply["sites"]:
        gpus = " ".join(f"{t} {g['free']}/{g['total']}" for t, g in s["gpus"].items())
        prices = " ".join(f"{t} {p:.2f}" for t, p in s["price_eur_per_gpu_hour"].items())
        if s["state"] != "up":
            state = f"[red]down[/] since {s['down_since'][11:19]}" if s.get("down_since") else "[red]down[/]"
        else:
            state = "[yellow]saturated[/]" if s["saturated"] else "[green]up[/]"
        table.add_row(s["site_id"], s["kind"], s["country"], state, gpus, str(s["queued"]),
                      _duration(s.get("est_wait_s", 0.0)) if s["state"] == "up" else "-",
                      f"{s['carbon_g_per_kwh']:.0f}", prices)
    console.print(table)
    console.print("[dim]carbon intensity: Electricity Maps 2022 hourly data[/]")


@app.command()
def overflow(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Overflow from public to paid capacity: jobs placed per site and tenant, and GPUs they hold now."""
    reply = _ask(lambda s: s.routing_overflow, {})
    if as_json:
        console.print_json(data=reply)
        return
    table = _table("overflow to paid capacity", ("site", "jobs", "GPUs now", "by tenant"))
    for site, row in sorted(reply["sites"].items()):
        table.add_row(site, str(row["jobs"]), str(row["gpus_now"]),
                      " ".join(f"{t}={n}" for t, n in sorted(row["by_tenant"].items())))
    console.print(table)


@app.command()
def bill(tenant: str,
         since: Annotated[datetime | None, typer.Option(help="RFC 3339")] = None,
         until: Annotated[datetime | None, typer.Option(help="RFC 3339")] = None,
         fmt: Annotated[str, typer.Option("--format", help="table | json | csv")] = "table") -> None:
    """A tenant's statement: one line per finished job, and the totals."""
    if fmt not in ("table", "json", "csv"):
        raise _fail("--format is table, json or csv", 2)
    body: dict[str, Any] = {"tenant": tenant}
    body.update({k: v.isoformat() for k, v in (("since", since), ("until", until)) if v})
    reply = _ask(lambda s: s.billing_statement, body)
    columns = ("job_id", "site", "gpu_type", "gpus", "seconds", "gpu_hours", "amount_eur", "allocation_hours",
               "energy_kwh", "co2e_kg")
    if fmt == "json":
        console.print_json(data=reply)
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([line[c] for c in columns] for line in reply["lines"])
        sys.stdout.write(out.getvalue())
    else:
        table = Table(title=f"statement for {tenant}")
        for col in columns:
            table.add_column(col, justify="right" if col not in ("job_id", "site", "gpu_type") else "left")
        for line in reply["lines"]:
            table.add_row(*(_fmt(line[c]) for c in columns))
        totals = reply["totals"]
        table.add_row("total", "", "", "", "", *(_fmt(totals[c]) for c in columns[5:]), style="bold")
        console.print(table)


@app.command()
def topup(tenant: str,
          eur: Annotated[float, typer.Option("--eur", min=0, help="euros added to this month's paid budget")] = 0.0,
          hours: Annotated[float, typer.Option("--hours", min=0, help="GPU-hours added to the allocation")] = 0.0,
          reason: Annotated[str, typer.Option(help="why, for the record")] = "",
          topup_id: Annotated[str | None, typer.Option("--id", help="makes a retried top-up count once; "
                                                                     "default: a new id")] = None) -> None:
    """Add to a tenant's paid budget (this month) or public allocation; prints where it stands."""
    if not eur and not hours:
        raise _fail("give --eur and/or --hours", 2)
    body = {"tenant": tenant, "amount_eur": eur, "allocation_hours": hours, "reason": reason,
            "topup_id": topup_id or uuid.uuid4().hex}
    reply = _ask(lambda s: s.billing_topup, body)
    table = _table(f"budgets of {tenant}" + ("" if reply["added"] else " (this top-up was recorded before)"),
                   ("budget", "period", "used", "limit", "share"))
    for b in reply["budgets"]:
        table.add_row(b["budget"], b["period"], _fmt(b["used"]), _fmt(b["limit"]), f"{b['share']:.0%}")
    console.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@app.command()
def watch(tenant: Annotated[str | None, typer.Option(help="only this tenant's job and billing events")] = None,
          sites_only: Annotated[bool, typer.Option("--sites", help="only site events (up, down, saturated, "
                                                                    "unsaturated)")] = False,
          ) -> None:
    """A live stream of events (jobs, sites, billing), until Ctrl-C."""
    settings = _client()
    subjects = Subjects(settings.prefix)
    if sites_only:
        topics = [subjects.site_event()]
    elif tenant:
        topics = list(subjects.tenant_events(tenant))
    else:
        topics = [subjects.events_all]

    async def stream() -> None:
        nc = await _connect(settings)
        queue: asyncio.Queue = asyncio.Queue()
        for topic in topics:
            await nc.subscribe(topic, cb=queue.put)
        console.print(f"[dim]watching {', '.join(topics)} (Ctrl-C stops)[/]")
        while True:
            msg = await queue.get()
            event = orjson.loads(msg.data)
            data = event.get("data", {})
            what = " ".join(f"{k}={data[k]}" for k in ("tenant", "site", "exit_code", "reason", "amount_eur",
                                                       "queued", "est_wait_s") if data.get(k) is not None)
            if event.get("type", "").startswith("continuum.site.") and data.get("gpus"):
                what += " free=" + ",".join(f"{t}:{g['free']}/{g['total']}" for t, g in data["gpus"].items())
            console.print(f"{event.get('time', '')[11:23]} [bold]{event.get('type', '')}[/] "
                          f"{event.get('subject', '')} {what}")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(stream())


@app.command()
def trace(job_id: str,
          width: Annotated[int, typer.Option(help="width of the time bars, in characters")] = 40) -> None:
    """A job's trace as a waterfall: every span from submission to billing, from the embedded span file
    (DATA_DIR/traces/spans.jsonl; with OTEL_EXPORTER_OTLP_ENDPOINT set, look in your tracing backend)."""
    from rich.text import Text

    from services.traces import job_trace, read_spans
    from shared.telemetry import TRACES_FILE, Attr

    path = _settings().data_dir / TRACES_FILE
    if not path.is_file():
        raise _fail(f"no span file at {path}: spans are written there by `continuum up` when no "
                    "OTEL_EXPORTER_OTLP_ENDPOINT is set")
    rows = job_trace(read_spans(path), job_id)
    if not rows:
        raise _fail(f"no spans of job {job_id} in {path} (spans are written about a second after they end)")
    start = min(r.span["start_ns"] for r in rows)
    total = max(max(r.span["end_ns"] for r in rows) - start, 1)
    table = Table(title=f"trace {rows[0].span['trace_id']}  job {job_id}  {total / 1e6:.1f} ms")
    for column in ("span", "service", "start", "duration", "", "what"):
        table.add_column(column, no_wrap=column != "what")
    shown = (Attr.SITE, Attr.OUTCOME, Attr.OVERFLOW, Attr.SCORE, Attr.EXIT_CODE, Attr.AMOUNT_EUR, Attr.BILLED_CO2E_KG)
    for row in rows:
        span, attrs = row.span, row.span.get("attributes", {})
        begin = round((span["start_ns"] - start) / total * width)
        length = max(1, round((span["end_ns"] - span["start_ns"]) / total * width))
        bar = Text(" " * min(begin, width - 1)) + Text("█" * min(length, width - min(begin, width - 1)),
                                                         style="red" if span.get("status") == "ERROR" else "cyan")
        what = " ".join(f"{key.rsplit('.', 1)[-1]}={attrs[key]}" for key in shown if key in attrs)
        offset_ms, duration_ms = (span["start_ns"] - start) / 1e6, (span["end_ns"] - span["start_ns"]) / 1e6
        table.add_row("  " * row.depth + span["name"], (span.get("service") or "").removeprefix("continuum-"),
                      f"+{offset_ms:.1f} ms", f"{duration_ms:.1f} ms", bar, what)
    console.print(table)


@app.command()
def demo(jobs: Annotated[int, typer.Option(help="how many jobs in the batch")] = 36,
         keep: Annotated[bool, typer.Option(help="keep the system running after the summary")] = False) -> None:
    """Start the system, submit a realistic mixed batch, show it run, and sum it up."""
    from services.demo import run_demo

    settings = _settings()
    _check_catalog(settings)
    raise typer.Exit(run_demo(settings, console, jobs=jobs, keep=keep))


@app.command()  # over 60 lines: its twelve options are a third of them, each with the help it shows
def replay(trace: Annotated[Path, typer.Argument(help="a job trace: Philly CSV, Alibaba v2023 pod list, or SWF",
                                                 exists=True, dir_okay=False)],
           sites: SitesOpt = None, tenants: TenantsOpt = None,
           out: Annotated[Path, typer.Option("--out", help="where the summary, CSVs, report and plots go")] = Path(
               "replay"),
           fmt: Annotated[str, typer.Option("--format", help="auto | philly | alibaba | swf")] = "auto",
           policy: Annotated[list[str] | None, typer.Option("--policy", help="repeat for several; default: all")]
           = None,
           start: Annotated[datetime, typer.Option(help="the date the trace's time 0 falls on (carbon, months)",
                                                  formats=["%Y-%m-%d"])] = REPLAY_START,
           jobs: Annotated[int | None, typer.Option(help="the first N jobs of the trace only")] = None,
           seed: Annotated[int, typer.Option(help="deals trace users out to tenants (same seed, same deal)")] = 0,
           users: Annotated[Path | None, typer.Option(help="YAML `users: {trace user: tenant}` overriding the "
                                                           "deal")] = None,
           user: Annotated[list[str] | None, typer.Option("--user", help="replay only this trace user's jobs (a "
                                                                        "Philly virtual cluster, say); repeat "
                                                                        "for several")] = None,
           gpu_type: Annotated[str, typer.Option("--gpu-type", help="the GPU type every trace job asks for: a "
                                                                   "catalog type, or any")] = "any",
           workers: Annotated[int | None, typer.Option(help="how many policies replay at once, a process each "
                                                            "(default: one a core)", min=1)] = None) -> None:
    """Replay a job trace through the production policy in virtual time, under each policy; write what it
    found (summary.json, jobs-<policy>.csv, report.md with plots)."""
    from datetime import UTC

    from rich.progress import Progress

    from services.replay import report
    from services.replay.engine import POLICIES
    from services.replay.runner import replay_policies
    from services.replay.traces import FORMATS, tenant_of

    if fmt not in ("auto", *FORMATS):
        raise _fail(f"--format {fmt!r}: one of auto, {', '.join(FORMATS)}", 2)
    unknown = sorted(set(policy or []) - set(POLICIES))
    if unknown:
        raise _fail(f"--policy {', '.join(unknown)}: one of {', '.join(POLICIES)}", 2)
    settings = _settings(sites_file=sites, tenants_file=tenants)
    catalog = _check_catalog(settings)
    overrides = (yaml.safe_load(users.read_text()) or {}).get("users", {}) if users else {}
    wrong = sorted({t for t in overrides.values() if t not in catalog.tenants})
    if wrong:
        raise _fail(f"{users}: no tenant {', '.join(wrong)} in the catalog", 2)
    offered = sorted({t for site in catalog.sites.values() for t in site.gpus})
    if gpu_type != "any" and gpu_type not in offered:
        raise _fail(f"--gpu-type {gpu_type}: the catalog offers {', '.join(offered)} (or any)", 2)
    trace_jobs = _trace_jobs(trace, fmt, user, jobs)
    deal = {u: tenant_of(u, list(catalog.tenants), overrides, seed) for u in sorted({j.user for j in trace_jobs})}
    when = start.replace(tzinfo=UTC)
    names = list(policy or POLICIES)
    with Progress(console=err, transient=True) as bar:
        tasks = {name: bar.add_task(name, total=len(trace_jobs)) for name in names}
        results = replay_policies(trace_jobs, catalog, names, when, deal, gpu_type, workers,
                                  lambda name, done: bar.update(tasks[name], completed=done))
    notes = {"trace": str(trace), "seed": str(seed), "GPU type asked": gpu_type,
             "users": f"{len(deal)} trace users dealt to "
             + ", ".join(f"{t} ({sum(1 for v in deal.values() if v == t)})" for t in sorted(catalog.tenants))}
    summary = report.write(out, trace.name, len(trace_jobs), results, when, notes)
    table = _table(f"replay of {trace.name}: {len(trace_jobs)} jobs from {when:%Y-%m-%d}",
                   ("policy", "run", "mean wait", "p95 wait", "cost EUR", "CO2e kg", "overflow", "residency"))
    for name, p in summary["policies"].items():
        table.add_row(name, str(p["jobs"]), _duration(p["mean_wait_s"]), _duration(p["p95_wait_s"]),
                      f"{p['cost_eur']:,.2f}", f"{p['co2e_kg']:,.1f}", str(p["overflow_jobs"]),
                      str(p["residency_violations"]))
    console.print(table)
    console.print(f"written to {out}: summary.json, jobs-<policy>.csv, report.md and its plots")


def _trace_jobs(trace: Path, fmt: str, users: list[str] | None, first: int | None) -> list:
    """The trace's jobs to replay: those of the given users only, if any, and the first N only, if told."""
    from services.replay.traces import TraceError, read

    try:
        jobs = read(trace, fmt)
    except TraceError as e:
        raise _fail(str(e), 2) from None
    if users:
        missing = sorted(set(users) - {j.user for j in jobs})
        if missing:
            raise _fail(f"--user {', '.join(missing)}: no such user in {trace.name}", 2)
        jobs = [j for j in jobs if j.user in users]
    return jobs[:first] if first else jobs


@auth_app.command("init")
def auth_init(sites: SitesOpt = None, tenants: TenantsOpt = None,
              out: Annotated[Path, typer.Option("--out", help="the folder to write (or bring up to date)")] = Path(
                  "auth"),
              host: Annotated[list[str] | None, typer.Option("--host", help="a name or address clients reach the "
                                                                             "server by, beside localhost and "
                                                                             "127.0.0.1; repeat for several")]
              = None,
              sync_interval: Annotated[str, typer.Option(
                  "--sync-interval", help="how often JetStream writes to disk: `always` (before each "
                                          "acknowledgement) or a duration such as 1s (docs/security.md)")]
              = "always",
              server_dir: Annotated[Path | None, typer.Option(
                  "--server-dir", help="where the NATS server will find this folder, if not where it is written (a "
                                       "Kubernetes Secret mounted at /etc/nats/auth, say): nats.conf names its TLS "
                                       "files by absolute path")] = None) -> None:
    """Write a nats-server configuration with a NATS account per tenant, a principal per site and for the operator
    and the services, TLS, credentials and HTTP tokens; again, after a catalog change (credentials are kept)."""
    from services.auth import init

    settings = _settings(sites_file=sites, tenants_file=tenants)
    catalog = _check_catalog(settings)
    if sync_interval != "always" and not re.fullmatch(r"\d+(ms|s|m|h)", sync_interval):
        raise _fail(f"--sync-interval {sync_interval!r}: `always` or a duration such as 500ms, 1s, 2m", 2)
    if server_dir and not server_dir.is_absolute():
        raise _fail(f"--server-dir {server_dir}: an absolute path, as the server will see it", 2)
    changes = init(out, catalog, host or [], prefix=settings.prefix, sync_interval=sync_interval,
                   server_dir=server_dir)
    for what, names in (("added", changes.added), ("kept", changes.kept), ("removed", changes.removed)):
        if names:
            console.print(f"{what}: {', '.join(names)}")
    console.print(f"server certificate {changes.certificate}; configuration in {out / 'nats.conf'} (run as "
                  f"`nats-server -c {out / 'nats.conf'} -p PORT -sd STORE`; a running one takes a change on "
                  "`nats-server --signal reload`, or SIGHUP)")


def main() -> None:
    # asyncio says this of every TLS connection nats-py closes; it is noise to a user
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    # the global options work after the command too (`continuum submit job.yaml --as lab`)
    args, hoisted = sys.argv[1:], []
    for option in GLOBAL_OPTIONS:
        while option in args[:-1]:
            at = args.index(option)
            hoisted += args[at:at + 2]
            del args[at:at + 2]
    app(hoisted + args)


if __name__ == "__main__":
    main()
