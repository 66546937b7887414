"""services/agent/backends/base.py: every backend `backend_for` builds is a `SiteBackend`, the one surface the agent
holds a site by: each member is there, sync or async as the protocol says, with its parameters (names, kinds,
defaults; the types are the type checker's business)."""

from __future__ import annotations

import inspect
import typing

import pytest

from services.agent.backends import SiteBackend, backend_for
from services.agent.backends.local import LocalBackend
from services.agent.backends.simulated import SimulatedBackend
from services.agent.backends.slurm import SlurmBackend
from shared.contracts.catalog import SiteEntry, SlurmOptions

MEMBERS = sorted(name for name in vars(SiteBackend) if not name.startswith("_"))


def site(backend: str) -> SiteEntry:
    return SiteEntry(id=backend, kind="private_cloud", country="FR", jurisdiction="EU", carbon_g_per_kwh=1,
                     backend=backend, gpus={"H100": 2}, price_eur_per_gpu_hour={"H100": 1.0},
                     slurm=SlurmOptions(partition="gpu") if backend == "slurm" else None)


def mismatches(backend: object) -> list[str]:
    """Where `backend` falls short of SiteBackend, one line per member."""
    if SiteBackend in type(backend).__mro__:
        return ["subclasses SiteBackend, so a missing member would pass unseen (the protocol's stub stands in)"]
    out = []
    for name in MEMBERS:
        wanted = vars(SiteBackend)[name]
        if not hasattr(backend, name):
            out.append(f"{name}: missing")
        elif isinstance(wanted, property):
            hint = typing.get_type_hints(wanted.fget)["return"]
            kind = typing.get_origin(hint) or hint
            if not isinstance(getattr(backend, name), kind):
                out.append(f"{name}: {type(getattr(backend, name)).__name__}, not a {kind.__name__}")
        elif not callable(got := getattr(backend, name)):
            out.append(f"{name}: not a method")
        elif inspect.iscoroutinefunction(got) != inspect.iscoroutinefunction(wanted):
            out.append(f"{name}: {'async' if inspect.iscoroutinefunction(wanted) else 'sync'} in the protocol")
        else:
            params = list(inspect.signature(got).parameters.values())  # bound: without self
            want = list(inspect.signature(wanted).parameters.values())[1:]
            # the protocol's parameters first, as they are (names, kinds, defaults); any more must be optional
            head = [(p.name, p.kind, p.default) for p in params[:len(want)]]
            if head != [(p.name, p.kind, p.default) for p in want] or any(p.default is p.empty
                                                                          for p in params[len(want):]):
                out.append(f"{name}({', '.join(map(_shown, params))}), not {name}({', '.join(map(_shown, want))})")
    return out


def _shown(param: inspect.Parameter) -> str:
    """A parameter as a signature shows it, without its annotation."""
    shown = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "") + param.name
    if param.kind == param.KEYWORD_ONLY:
        shown = "*, " + shown
    return shown if param.default is param.empty else f"{shown}={param.default!r}"


def test_the_protocol_has_what_the_agent_uses():
    assert MEMBERS == ["cancel", "capacity", "close", "jobs", "known", "queued", "running", "start", "submit",
                       "waited_total"]


@pytest.mark.parametrize(("backend", "cls"), [("simulated", SimulatedBackend), ("local", LocalBackend),
                                              ("slurm", SlurmBackend)])
def test_every_backend_is_a_site_backend(backend, cls):
    built = backend_for(site(backend), reports=None)
    assert type(built) is cls
    assert mismatches(built) == []


# the check itself: a backend written from scratch passes, and spoiling any one member fails it
async def _start(self) -> None: ...
async def _submit(self, order) -> bool: ...
async def _cancel(self, job_id, reason, superseded=False, attempt=None) -> bool: ...
async def _close(self) -> None: ...
async def _cancel_any(self, job_id, reason, superseded=False) -> bool: ...
async def _cancel_always_superseded(self, job_id, reason, superseded=True, attempt=None) -> bool: ...
async def _submit_with(self, order, priority) -> bool: ...
def _close_sync(self) -> None: ...


RIGHT = {"known": set(), "running": {}, "waited_total": 0, "start": _start, "submit": _submit, "cancel": _cancel,
         "capacity": lambda self: {}, "queued": lambda self: 0, "jobs": lambda self: [], "close": _close}


def sketch(**spoilt) -> object:
    members = {name: value for name, value in {**RIGHT, **spoilt}.items() if value is not None}
    return type("Sketch", (), members)()


def test_a_backend_written_from_scratch_passes_the_check():
    assert mismatches(sketch()) == []


@pytest.mark.parametrize(("spoilt", "said"), [
    ({"jobs": None}, "jobs: missing"),
    ({"known": []}, "known: list, not a Set"),
    ({"cancel": _cancel_any}, "cancel(job_id, reason, superseded=False), not"),
    ({"cancel": _cancel_always_superseded}, "cancel(job_id, reason, superseded=True, attempt=None), not"),
    ({"submit": _submit_with}, "submit(order, priority), not"),
    ({"close": _close_sync}, "close: async in the protocol"),
    ({"queued": 0}, "queued: not a method"),
])
def test_a_backend_short_of_one_member_fails_the_check(spoilt, said):
    found = mismatches(sketch(**spoilt))
    assert len(found) == 1 and found[0].startswith(said), found


def test_subclassing_the_protocol_fails_the_check():
    class Lazy(SiteBackend):  # inherits every member as a stub: nothing is really there
        pass
    assert mismatches(Lazy()) != []
