"""The HTTP gateway end to end (CONTRACT.md, v2 "HTTP"): `continuum up` with a site that runs real processes,
driven by py-tes as workflow engines drive a TES server, and by plain HTTP for the REST API and its events.
On the open system a request names its tenant; on the default one each principal uses its own token."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import tes

from tests.e2e.harness import CATALOG, start_system
from tests.e2e.http import gateway_when_up, sse, until
from tests.tes_schema import check

pytestmark = pytest.mark.e2e
LAB, ACME = "tenant-lab", "tenant-acme"


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path, "http_sites.yaml", "http_tenants.yaml")


def task(http, tenant: str, command: list[str], *, gpus: int = 1, tags: dict | None = None, **parameters: str):
    return tes.Task(name=f"{tenant}-task", executors=[tes.Executor(image="alpine:3.20", command=command)],
                    tags=http.tags(tenant, **(tags or {})),
                    resources=tes.Resources(cpu_cores=1, backend_parameters={"gpus": str(gpus),
                                                                              "gpu_type": "H100", **parameters}))


async def test_a_tes_task_runs_to_complete_and_a_failing_one_ends_in_executor_error(system):
    http = await gateway_when_up(system)
    client = http.tes(LAB)

    info = await asyncio.to_thread(client.get_service_info)
    assert {"gpus", "gpu_type", "residency"} <= set(info.tes_resources_backend_parameters)
    ok = await asyncio.to_thread(client.create_task, task(http, "lab", ["sh", "-c", "echo hello"]))
    bad = await asyncio.to_thread(client.create_task, task(http, "lab", ["sh", "-c", "exit 3"]))
    await asyncio.to_thread(client.wait, ok, 60)
    await asyncio.to_thread(client.wait, bad, 60)

    done = await asyncio.to_thread(client.get_task, ok, "FULL")
    failed = await asyncio.to_thread(client.get_task, bad, "FULL")
    assert done.state == "COMPLETE" and done.logs[0].logs[0].exit_code == 0
    assert failed.state == "EXECUTOR_ERROR" and failed.logs[0].logs[0].exit_code == 3
    assert done.logs[0].metadata["continuum.site"] == "local-fr"  # lab's residency: the site of real processes
    async with http.client(LAB) as web:
        for task_id in (ok, bad):
            check((await web.get(f"/ga4gh/tes/v1/tasks/{task_id}", params={"view": "FULL"})).json(), "tesTask")


async def test_a_task_asking_for_french_residency_runs_only_in_france(system):
    http = await gateway_when_up(system)
    client = http.tes(ACME)

    anywhere = await asyncio.to_thread(client.create_task, task(http, "acme", ["true"], gpus=4))
    in_france = await asyncio.to_thread(client.create_task, task(http, "acme", ["true"], gpus=4, residency="FR"))
    for task_id in (anywhere, in_france):
        await asyncio.to_thread(client.wait, task_id, 60)

    sites = {}
    for task_id in (anywhere, in_france):
        found = await asyncio.to_thread(client.get_task, task_id, "FULL")
        assert found.state == "COMPLETE", found.logs
        sites[task_id] = found.logs[0].metadata["continuum.site"]
    # without residency, the cheaper and greener Swedish cloud; with FR, only the French site
    assert (sites[anywhere], sites[in_france]) == ("cloud-se", "local-fr")


async def test_cancel_gives_canceling_then_canceled(system):
    http = await gateway_when_up(system)
    client = http.tes(LAB)
    # a job that takes a second to stop when asked: long enough to be seen stopping
    slow_to_stop = ["sh", "-c", "trap 'sleep 1; exit 0' TERM; sleep 120 & wait"]
    task_id = await asyncio.to_thread(client.create_task, task(http, "lab", slow_to_stop))

    async def running():
        return (await asyncio.to_thread(client.get_task, task_id, "MINIMAL")).state == "RUNNING"
    await until(running, 60, "the task running")
    await asyncio.to_thread(client.cancel_task, task_id)

    assert (await asyncio.to_thread(client.get_task, task_id, "MINIMAL")).state == "CANCELING"
    final = await asyncio.to_thread(client.wait, task_id, 60)
    async def canceled():
        return (await asyncio.to_thread(client.get_task, task_id, "MINIMAL")).state == "CANCELED"
    assert final.state in ("CANCELING", "CANCELED")  # py-tes stops waiting at any state but queued or running
    await until(canceled, 30, "the task canceled")


async def test_list_tasks_pages_through_300_tasks(system):
    http = await gateway_when_up(system)
    client = http.tes(ACME)
    # whatever their state (some run for an hour on the simulated site, the others wait or run elsewhere)
    created = set()
    for n in range(300):
        created.add(await asyncio.to_thread(client.create_task, task(http, "acme", ["true"], tags={
            "sim.runtime_s": "3600", "batch": "b1" if n % 3 else "b0"})))

    listed, token, pages = [], None, 0
    while True:
        page = await asyncio.to_thread(client.list_tasks, "BASIC", 64, token)
        listed += [t.id for t in page.tasks]
        assert len(page.tasks) <= 64
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(listed) == len(set(listed)) == 300 and set(listed) == created and pages == 5
    async with http.client(ACME) as web:
        found = (await web.get("/ga4gh/tes/v1/tasks", params={"tag_key": "batch", "tag_value": "b0", "view": "BASIC",
                                                               "page_size": 500})).json()
        assert len(found["tasks"]) == 100 and "next_page_token" not in found
        check(found, "tesListTasksResponse")


async def test_a_tenant_sees_none_of_another_tenants_tasks_jobs_or_events(system):
    http = await gateway_when_up(system)
    if not http.secure:
        pytest.skip("an open API has no principals to keep apart (the default system has)")
    acme_task = await asyncio.to_thread(http.tes(ACME).create_task, task(http, "acme", ["true"]))
    async with http.client(LAB) as lab, http.client(ACME) as acme:
        for path in (f"/ga4gh/tes/v1/tasks/{acme_task}", f"/api/v1/jobs/{acme_task}",
                     "/api/v1/tenants/acme/statement"):
            assert (await lab.get(path)).status_code == 404, path
        for path in (f"/ga4gh/tes/v1/tasks/{acme_task}:cancel", f"/api/v1/jobs/{acme_task}/cancel"):
            assert (await lab.post(path)).status_code == 404, path
        assert (await acme.get(f"/api/v1/jobs/{acme_task}")).json()["state"] != "cancelled"
        tasks = (await lab.get("/ga4gh/tes/v1/tasks", params={"page_size": 2000})).json()["tasks"]
        jobs = (await lab.get("/api/v1/jobs", params={"tenant": "acme"})).json()["jobs"]
        assert acme_task not in [t["id"] for t in tasks] and jobs == []
        # a JobSpec naming another tenant is refused, with the reason
        posed = await lab.post("/api/v1/jobs", json=http.spec("acme"))
        assert posed.status_code == 400 and posed.json()["state"] == "rejected"

        # lab's event stream from the first event: its own job's events, none of acme's
        lab_job = (await lab.post("/api/v1/jobs", json=http.spec("lab"))).json()["job_id"]
        seen = []
        async for _, event in sse(lab, "/api/v1/events?after=0"):
            seen.append(event)
            if event.get("subject") == lab_job and event["type"].endswith(".succeeded"):
                break
        tenants = {e["data"]["tenant"] for e in seen if e["type"].startswith(("continuum.job.", "continuum.billing."))}
        assert tenants == {"lab"} and acme_task not in {e.get("subject") for e in seen}

    async with http.client(None) as anonymous:
        for path in ("/ga4gh/tes/v1/tasks", "/api/v1/jobs", "/api/v1/events"):
            assert (await anonymous.get(path)).status_code == 401, path
        forged = {"Authorization": "Bearer " + "x" * 43}
        assert (await anonymous.get("/api/v1/jobs", headers=forged)).status_code == 401
        wrong_user = (await anonymous.get("/api/v1/jobs", auth=("tenant-acme", http.token(LAB) or ""))).status_code
        right_user = (await anonymous.get("/api/v1/jobs", auth=("tenant-lab", http.token(LAB) or ""))).status_code
        assert (wrong_user, right_user) == (401, 200)


async def test_events_come_in_order_and_resume_after_a_dropped_connection_without_gap_or_repeat(system):
    http = await gateway_when_up(system)
    async with http.client(LAB) as web:
        start = 0
        job_id = (await web.post("/api/v1/jobs", json=http.spec("lab"))).json()["job_id"]
        first: list[tuple[int, dict]] = []
        async for seq, event in sse(web, f"/api/v1/events?after={start}"):
            first.append((seq, event))
            if len(first) == 2:
                break  # the connection drops here
        rest: list[tuple[int, dict]] = []
        async for seq, event in sse(web, "/api/v1/events", **{"Last-Event-ID": str(first[-1][0])}):
            rest.append((seq, event))
            if event.get("subject") == job_id and event["type"].endswith(".succeeded"):
                break
        whole: list[tuple[int, dict]] = []
        async for seq, event in sse(web, f"/api/v1/events?after={start}"):
            whole.append((seq, event))
            if seq == rest[-1][0]:
                break
    resumed = [seq for seq, _ in first + rest]
    assert resumed == [seq for seq, _ in whole] and resumed == sorted(set(resumed))
    kinds = [e["type"].rsplit(".", 1)[-1] for _, e in first + rest if e.get("subject") == job_id]
    assert kinds[0] == "accepted" and kinds[-1] == "succeeded" and kinds.index("started") < kinds.index("succeeded")


async def test_the_event_stream_says_it_is_open_and_misses_nothing_published_after(system):
    http = await gateway_when_up(system)
    async with http.client(LAB) as web, web.stream("GET", "/api/v1/events",
                                                 timeout=httpx.Timeout(30.0, read=60.0)) as response:
        lines = response.aiter_lines()
        assert await anext(lines) == ": open"  # before any event, and before the 15 s keep-alive
        job_id = (await web.post("/api/v1/jobs", json=http.spec("lab"))).json()["job_id"]
        async for line in lines:  # from now on: its very first event comes
            if line.startswith("data:") and json.loads(line[5:])["subject"] == job_id:
                assert json.loads(line[5:])["type"] == "continuum.job.accepted"
                break


async def test_rest_lists_filter_and_page(system):
    http = await gateway_when_up(system)
    async with http.client() as web:
        ids = {}
        for tenant, gpus, labels in (("lab", 1, {}), ("lab", 2, {}), ("acme", 1, {"sim.runtime_s": "3600"}),
                                     ("acme", 1, {})):
            reply = await web.post("/api/v1/jobs", json=http.spec(
                tenant, resources={"gpus": gpus, "gpu_type": "H100"}, labels=labels))
            assert reply.status_code == 201, reply.text
            ids[reply.json()["job_id"]] = tenant
        long_one = next(j for j, t in ids.items() if t == "acme")

        async def settled():
            jobs = (await web.get("/api/v1/jobs", params={"state": ["succeeded"], "limit": 500})).json()["jobs"]
            return len([j for j in jobs if j["job_id"] in ids]) == 3
        await until(settled, 60, "three jobs succeeded")

        by_tenant = (await web.get("/api/v1/jobs", params={"tenant": "lab"})).json()["jobs"]
        assert {j["job_id"] for j in by_tenant} == {j for j, t in ids.items() if t == "lab"}
        at_se = (await web.get("/api/v1/jobs", params={"site": "cloud-se"})).json()["jobs"]
        assert {j["job_id"] for j in at_se} == {j for j, t in ids.items() if t == "acme"}
        running = (await web.get("/api/v1/jobs", params={"state": ["started", "dispatched", "placed"]})).json()
        assert [j["job_id"] for j in running["jobs"]] == [long_one]
        pages, token = [], None
        while True:
            page = (await web.get("/api/v1/jobs", params={"limit": 1, **({"page_token": token} if token else {})}
                                  )).json()
            pages.append([j["job_id"] for j in page["jobs"]])
            token = page.get("next_page_token")
            if not token:
                break
        assert [j for p in pages for j in p] == list(reversed(ids))  # newest first, one a page
        later = (await web.get("/api/v1/jobs", params={"since": "2999-01-01T00:00:00Z"})).json()["jobs"]
        assert later == []


async def test_malformed_requests_get_a_4xx_with_a_reason(system):
    http = await gateway_when_up(system)
    async with http.client(LAB) as web:
        answers = {
            "bad json": await web.post("/ga4gh/tes/v1/tasks", content=b"{not json",
                                       headers={"Content-Type": "application/json"}),
            "wrong types": await web.post("/ga4gh/tes/v1/tasks", json={"executors": "run it"}),
            "no executor": await web.post("/ga4gh/tes/v1/tasks", json={"executors": []}),
            "huge body": await web.post("/api/v1/jobs", content=b"x" * (1 << 20),
                                        headers={"Content-Type": "application/json"}),
            "unknown task": await web.get("/ga4gh/tes/v1/tasks/nope"),
            "odd task id": await web.get("/ga4gh/tes/v1/tasks/..%2F..%2Fetc"),
            "bad page token": await web.get("/ga4gh/tes/v1/tasks", params={"page_token": "garbage"}),
            "page too big": await web.get("/ga4gh/tes/v1/tasks", params={"page_size": 5000}),
            "bad state": await web.get("/api/v1/jobs", params={"state": "sleeping"}),
            "bad event id": await web.get("/api/v1/events", headers={"Last-Event-ID": "last"}),
            "unknown job": await web.get("/api/v1/jobs/nope"),
        }
    for what, answer in answers.items():
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text)
        assert answer.json().get("detail"), (what, answer.text)
    assert answers["huge body"].status_code == 413
    assert answers["unknown task"].status_code == answers["unknown job"].status_code == 404


@pytest.fixture
def files_system(nats_server, tmp_path):
    """The HTTP catalog with the French site staging files beneath a folder of the test's."""
    root = tmp_path / "files"
    root.mkdir()
    sites = (CATALOG / "http_sites.yaml").read_text().replace(
        "    backend: local\n", f"    backend: local\n    files_root: {root}\n")
    (tmp_path / "sites.yaml").write_text(sites)
    yield from start_system(nats_server, tmp_path, str(tmp_path / "sites.yaml"), "http_tenants.yaml")


async def test_a_task_with_a_script_input_three_executors_and_an_output_runs_them_in_order(files_system, tmp_path):
    http = await gateway_when_up(files_system)
    client = http.tes(LAB)
    root = tmp_path / "files"
    task_id = await asyncio.to_thread(client.create_task, tes.Task(
        name="snakemake-like",
        # as Snakemake sends its job script: an input with content, run by the first executor
        inputs=[tes.Input(path=f"{root}/job.sh", content="tr a-z A-Z < $1 > $2\n"),
                tes.Input(path=f"{root}/in.txt", content="hello\n")],
        outputs=[tes.Output(path=f"{root}/out.txt", url=f"file://{root}/results/out.txt")],
        executors=[tes.Executor(image="alpine", command=["sh", f"{root}/job.sh", f"{root}/in.txt", f"{root}/up.txt"]),
                   tes.Executor(image="alpine", command=["sh", "-c", "exit 2"], ignore_error=True),
                   tes.Executor(image="alpine", command=["cp", f"{root}/up.txt", f"{root}/out.txt"])],
        tags=http.tags("lab"), resources=tes.Resources(backend_parameters={"gpus": "1"})))
    await asyncio.to_thread(client.wait, task_id, 60)

    done = await asyncio.to_thread(client.get_task, task_id, "FULL")
    assert done.state == "COMPLETE", done.logs
    assert (root / "results" / "out.txt").read_text() == "HELLO\n"
    assert [e.command[0] for e in done.executors] == ["sh", "sh", "cp"] and done.executors[1].ignore_error
    assert done.inputs[0].content.startswith("tr a-z")  # FULL shows contents; BASIC would not

    async with http.client(LAB) as web:
        refused = await web.post("/ga4gh/tes/v1/tasks", json={
            "executors": [{"image": "alpine", "command": ["true"]}], "tags": http.tags("lab"),
            "inputs": [{"path": f"{root}/x", "url": "s3://bucket/x"}]})
    assert refused.status_code == 400 and "inputs.0.url" in refused.json()["detail"]


async def test_tes_lists_filter_by_name_prefix_state_and_tag_in_each_view(system):
    """The cases of the GA4GH TES conformance suite (not on PyPI, so not run here): filters and views."""
    http = await gateway_when_up(system)
    client = http.tes(LAB)
    named = {}
    for name in ("align-1", "align-2", "call-1"):
        sent = task(http, "lab", ["true"] if name != "call-1" else ["sh", "-c", "exit 1"], tags={"step": name[:-2]})
        sent.name = name
        named[name] = await asyncio.to_thread(client.create_task, sent)
    for task_id in named.values():
        await asyncio.to_thread(client.wait, task_id, 60)

    async with http.client(LAB) as web:
        async def listed(**params) -> list[dict]:
            reply = await web.get("/ga4gh/tes/v1/tasks", params={"page_size": 100, **params})
            assert reply.status_code == 200, reply.text
            return reply.json()["tasks"]
        by_prefix = await listed(name_prefix="align", view="BASIC")
        assert sorted(t["name"] for t in by_prefix) == ["align-1", "align-2"]
        assert {t["id"] for t in await listed(state="EXECUTOR_ERROR")} == {named["call-1"]}
        assert {t["id"] for t in await listed(state="COMPLETE")} == {named["align-1"], named["align-2"]}
        assert {t["id"] for t in await listed(tag_key="step", tag_value="call")} == {named["call-1"]}
        assert len(await listed(tag_key="step")) == 3  # a key alone matches any value
        minimal, basic, full = [await listed(view=v, name_prefix="call") for v in ("MINIMAL", "BASIC", "FULL")]
        assert set(minimal[0]) == {"id", "state"}
        assert "system_logs" not in basic[0]["logs"][0] and full[0]["logs"][0]["system_logs"]
        for found in (*basic, *full):
            check(found, "tesTask")
        info = (await web.get("/ga4gh/tes/v1/service-info")).json()
        assert info["type"] == {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"}
        assert all(isinstance(k, str) for k in info["tesResources_backend_parameters"] + info["storage"])
        for missing in (await web.get("/ga4gh/tes/v1/tasks/absent"), await web.post("/v1/tasks/absent:cancel")):
            assert missing.status_code == 404
