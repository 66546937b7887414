"""Liveness and readiness, served beside the Prometheus metrics on a service's CONTINUUM_METRICS_PORT:

- `/healthz`: 200 `{"status": "alive"}` whenever the process answers at all;
- `/readyz`: 200 `{"status": "ready"}` when every part of the process that registered a check can do its work
  (the bus connected to NATS, its consumers and responders bound; the gateway's HTTP server listening), else
  503 `{"status": "not ready", "reasons": {part: why}}`, as while NATS is away;
- any other path: the metrics, as prometheus_client serves them (`/metrics`).

An orchestrator restarts what is not alive and sends no work to what is not ready; `continuum up` says the
system is up once every service's `/readyz` answers 200. The checks are read from the server's threads: each
reads a flag or two of its part, never waits on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson

Check = Callable[[], str | None]  # why this part cannot work now; None when it can
WsgiApp = Callable[[dict, Callable], Iterable[bytes]]

HEALTHZ, READYZ = "/healthz", "/readyz"
# the process's parts, by name: a process serves one endpoint, whatever runs in it
_checks: dict[str, Check] = {}
STARTING = "starting: nothing has said it is ready yet"


def require(part: str, check: Check) -> None:
    """Readiness needs `check` to pass too (a part registered again replaces its check)."""
    _checks[part] = check


def readiness() -> dict[str, str]:
    """Why this process is not ready, by part; empty when it is. A process no part has registered with yet is
    still starting."""
    if not _checks:
        return {"process": STARTING}
    reasons = {}
    for part, check in list(_checks.items()):
        try:
            reason = check()
        except Exception as e:  # a check that fails is a part that cannot say it is ready
            reason = f"{type(e).__name__}: {e}"
        if reason:
            reasons[part] = reason
    return reasons


def health_app(metrics: WsgiApp) -> WsgiApp:
    """/healthz and /readyz, and `metrics` for every other path."""
    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == HEALTHZ:
            return _json(start_response, 200, {"status": "alive"})
        if path == READYZ:
            reasons = readiness()
            if reasons:
                return _json(start_response, 503, {"status": "not ready", "reasons": reasons})
            return _json(start_response, 200, {"status": "ready"})
        return metrics(environ, start_response)
    return app


def _json(start_response: Callable, status: int, body: dict) -> list[bytes]:
    data = orjson.dumps(body)
    start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                    ("Cache-Control", "no-store")])
    return [data]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the process's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, *_: Any) -> None:
        """Probes every few seconds are not news: no access log."""


def serve(port: int, metrics: WsgiApp, host: str = "0.0.0.0") -> WSGIServer:
    """Serve health and metrics on `port` (every interface by default: a container's port is probed and scraped
    from outside), in a daemon thread; OSError if the port is taken."""
    server = make_server(host, port, health_app(metrics), server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name=f"health-{port}", daemon=True).start()
    return server
