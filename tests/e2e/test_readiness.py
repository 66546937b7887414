"""Readiness as a script sees it: `continuum up --detach` returns once a submission made at once is served,
`continuum down` leaves nothing running, `continuum wait-ready` tells a ready system from none, and each
service's /readyz follows its NATS connection (503 while the server is away, 200 once it is back)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from services.runtime import free_port, pid_alive
from shared.bus import connect, request_json
from tests.conftest import SUBJECTS
from tests.e2e.harness import CATALOG, operator, record_when, start_system, system_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
JOB = {"tenant": "lab", "name": "at-once", "command": ["train"], "resources": {"gpus": 1, "gpu_type": "H100"},
       "walltime_s": 60, "labels": {"sim.runtime_s": "0.1"}}
UP = ("up", "--sites", str(CATALOG / "sites.yaml"), "--tenants", str(CATALOG / "tenants.yaml"))


def continuum(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=dict(env, COLUMNS="300"),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def answer(url: str) -> tuple[int, dict]:
    """A service's /readyz or /healthz: its status, and its JSON body (0 and {} when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def until(condition, timeout: float, what: str):
    """Poll `condition` (another process's state: nothing to wait on but a new look) until it holds."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
    return found


def refused(url: str) -> bool:
    address = urlsplit(url)
    try:
        with socket.create_connection((address.hostname, address.port), timeout=1):
            return False
    except OSError:
        return True


@pytest.fixture
def env(nats_server, tmp_path):
    """The environment of a system the test runs in the background; stopped at the end if the test did not."""
    env = system_env(nats_server, tmp_path)
    yield env
    if (tmp_path / "data" / "state.json").exists():
        continuum(env, "down")


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path)


async def test_up_detach_returns_once_a_submission_at_once_is_served_and_down_stops_everything(nats_server, env,
                                                                                             tmp_path):
    data_dir = tmp_path / "data"
    job = tmp_path / "job.json"
    job.write_text(json.dumps(JOB))
    for round_ in range(2):  # a second time on what the first left (its store, its logs)
        started = continuum(env, *UP, "--detach")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "continuum is up" in started.stdout and "`continuum down` stops it" in started.stdout
        submitted = continuum(env, "submit", str(job))  # at once: no "nothing serves" / no responders
        assert submitted.returncode == 0 and submitted.stdout.startswith("accepted"), submitted.stderr

        state = json.loads((data_dir / "state.json").read_text())
        assert state["ready"] is True and state["not_ready"] == {}
        assert set(state["readyz"]) == set(state["services"]) == set(state["metrics"])
        assert all(answer(url) == (200, {"status": "ready"}) for url in state["readyz"].values())
        assert pid_alive(state["pid"]) and Path(state["logs"]) == (data_dir / "logs").resolve()
        assert "continuum is up" in (data_dir / "logs" / "up.log").read_text()
        if round_ == 0:
            ready = continuum(env, "wait-ready", "--timeout", "30")
            assert ready.returncode == 0 and "continuum is ready" in ready.stdout, ready.stderr
            again = continuum(env, *UP, "--detach")  # one system a data directory
            assert again.returncode == 1 and f"(`continuum up`, pid {state['pid']})" in again.stderr

        nc = await connect(operator(data_dir, nats_server.url if nats_server else None))
        record = await record_when(nc, submitted.stdout.split()[1], "succeeded")
        assert record["state"] == "succeeded", f"round {round_}: {record}"
        await nc.close()

        stopped = continuum(env, "down")
        assert stopped.returncode == 0, stopped.stderr
        assert f"pid {state['pid']}" in stopped.stdout
        # when `down` returns, the supervisor, every service it ran and its own nats-server are gone
        assert [name for name, pid in {"up": state["pid"], **state["services"]}.items() if pid_alive(pid)] == []
        assert not (data_dir / "state.json").exists()
        assert all(refused(url) for url in state["readyz"].values())
        if nats_server is None:
            assert refused(state["nats_url"]), "the embedded nats-server still runs"
    assert continuum(env, "down").returncode == 1


def test_wait_ready_and_down_without_a_running_system_say_so(tmp_path):
    env = system_env(None, tmp_path)
    data_dir = tmp_path / "data"
    waited = continuum(env, "wait-ready", "--timeout", "1")
    assert waited.returncode == 1
    assert f"not ready within 1 s: no running system found (no {data_dir / 'state.json'})" in waited.stderr
    assert continuum(env, "down").returncode == 1

    # what a supervisor killed outright leaves behind: a state file whose pid is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(gone.stdout)
    data_dir.mkdir()
    (data_dir / "state.json").write_text(json.dumps({"nats_url": "nats://127.0.0.1:1", "pid": pid, "services": {},
                                                     "readyz": {"intake": "http://127.0.0.1:1/readyz"}}))
    waited = continuum(env, "wait-ready", "--timeout", "0")
    assert waited.returncode == 1 and f"its supervisor (pid {pid}) is gone" in waited.stderr
    down = continuum(env, "down")
    assert down.returncode == 1 and f"its supervisor (pid {pid}) is gone" in down.stderr
    assert not (data_dir / "state.json").exists()


def test_up_that_is_not_ready_in_time_names_each_service_and_its_log_and_leaves_nothing(tmp_path):
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens: no service can be ready
    env = dict(system_env(None, tmp_path), CONTINUUM_NATS_URL=nowhere)
    started = continuum(env, *UP, "--detach", "--timeout", "3")
    assert started.returncode == 1, started.stdout
    logs = (tmp_path / "data" / "logs").resolve()
    assert "not every service was ready within 3 s" in started.stderr
    for service in ("intake", "capacity", "routing", "billing", "gateway", "agent"):
        assert f"  {service}: " in started.stderr and f"(log: {logs / service}.log)" in started.stderr
    assert "continuum stopped" in started.stderr + started.stdout
    assert not (tmp_path / "data" / "state.json").exists()


@pytest.mark.parametrize("nats_server", ["open"], indirect=True)  # a server of the test's own, to stop and start
async def test_readyz_is_503_while_nats_is_away_and_200_once_it_is_back(nats_server, system):
    ready = continuum(system.env, "wait-ready", "--timeout", "120")
    assert ready.returncode == 0, ready.stderr
    nc = await connect(system.client())
    first = await request_json(nc, SUBJECTS.jobs_submit, JOB)  # at once: served
    assert first["state"] == "accepted", first
    # over before the server goes (a site's report sent while it is away is another matter than readiness)
    record = await record_when(nc, first["job_id"], "succeeded")
    assert record["state"] == "succeeded", record
    await nc.close()
    state = json.loads((system.data_dir / "state.json").read_text())
    urls = state["readyz"]

    nats_server.stop()  # its JetStream store stays on disk

    def all_waiting_for_nats():
        answers = {name: answer(url) for name, url in urls.items()}
        return all(status == 503 and "NATS" in " ".join(body["reasons"].values())
                   for status, body in answers.values()) and answers
    answers = await asyncio.to_thread(until, all_waiting_for_nats, 30, "every /readyz to be 503 for NATS")
    assert answers["intake"][1] == {"status": "not ready",
                                    "reasons": {"bus": "NATS connection lost: reconnecting"}}
    assert all(answer(url.replace("/readyz", "/healthz")) == (200, {"status": "alive"})  # alive all the same
               for url in urls.values())
    waited = continuum(system.env, "wait-ready", "--timeout", "1")
    assert waited.returncode == 1 and "intake: bus: NATS connection lost: reconnecting" in waited.stderr
    # the supervisor sees it too (it looks every few seconds once the system is up)
    await asyncio.to_thread(until, lambda: not json.loads((system.data_dir / "state.json").read_text())["ready"],
                            30, "the state file to say the system is not ready")

    nats_server.start()  # the same port and store: its streams and consumers come back with it
    await asyncio.to_thread(until, lambda: all(answer(url)[0] == 200 for url in urls.values()), 60,
                            "every /readyz to be 200 again")
    assert continuum(system.env, "wait-ready", "--timeout", "5").returncode == 0
    nc = await connect(system.client())
    second = await request_json(nc, SUBJECTS.jobs_submit, dict(JOB, name="after"))
    assert second["state"] == "accepted", second
    record = await record_when(nc, second["job_id"], "succeeded")  # the consumers work again
    assert record["state"] == "succeeded", record
    await nc.close()
    await asyncio.to_thread(until, lambda: json.loads((system.data_dir / "state.json").read_text())["ready"], 30,
                            "the state file to say the system is ready again")
