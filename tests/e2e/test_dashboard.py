"""The operator dashboard at `/` in a real browser: Debian's chromium (deploy/browser/chromium.sh installs it)
driven by Playwright, against `continuum up` with the HTTP tests' catalog. On the default system the page asks
for a token and acts as its principal; on the open one it asks nothing.

Each test saves screenshots in its tmp dir; with CONTINUUM_SCREENSHOTS=DIR, those of the default system are
copied there too (docs/screenshots holds some, from a real run)."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from shared.contracts.catalog import Catalog
from shared.contracts.jobs import JobState
from tests.e2e.harness import CATALOG, start_system
from tests.e2e.http import Http, gateway_when_up

pytestmark = pytest.mark.e2e
LAB, ACME = "tenant-lab", "tenant-acme"
SITES = list(Catalog.load(CATALOG / "http_sites.yaml", CATALOG / "http_tenants.yaml").sites)
# shown as each job's trace link, never visited
JAEGER = "http://jaeger.example:16686"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# what the page has to show within (a job runs in a second or two; the rest is a loaded 2-core machine)
WAIT_MS = 60_000


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path, "http_sites.yaml", "http_tenants.yaml",
                            CONTINUUM_JAEGER_URL=JAEGER)


@dataclass
class Browser:
    context: BrowserContext
    # what the pages threw or logged as errors, and every URL they asked for
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    async def new_page(self) -> Page:
        page = await self.context.new_page()
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("request", lambda request: self.requests.append(request.url))
        return page

    @property
    def unexpected_errors(self) -> list[str]:
        # chromium logs each request answered 401: the page asking who it is before it has a token, a wrong token
        return [e for e in self.errors if "status of 401" not in e]

    def elsewhere(self, http: Http) -> list[str]:
        """What the pages asked of anything but the gateway (nothing: the dashboard works offline)."""
        return [url for url in self.requests if not url.startswith(http.url + "/")]


@pytest.fixture
async def browser(chromium, tmp_path):
    """Chromium with a fresh profile, a test's own."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        yield Browser(context)
        await context.close()


async def open_dashboard(browser: Browser, http: Http, principal: str = "operator", path: str = "/") -> Page:
    """The dashboard as `principal` (signing in with its token on the default system), once its events are live."""
    page = await browser.new_page()
    await page.goto(http.url + path)
    if http.secure:
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        await page.get_by_label("Token").fill(http.token(principal) or "")
        await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#who")).to_contain_text(principal if http.secure else "Open API")
    await expect(page.locator("#live")).to_have_text("Live", timeout=WAIT_MS)
    return page


async def screenshot(page: Page, http: Http, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=path, full_page=True)
    folder = os.environ.get("CONTINUUM_SCREENSHOTS")
    if folder and http.secure:  # the default system's: the page as an operator or tenant sees it
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)


def job_row(page: Page, job_id: str):
    return page.locator(f'#jobs tr[data-job="{job_id}"]')


async def submit(http: Http, principal: str, tenant: str, **fields) -> str:
    async with http.client(principal) as web:
        reply = await web.post("/api/v1/jobs", json=http.spec(tenant, **fields))
        assert reply.status_code == 201, reply.text
        return reply.json()["job_id"]


async def test_the_page_shows_the_sites_and_a_job_live_until_it_succeeds_with_its_decision(system, browser, tmp_path):
    http = await gateway_when_up(system)
    page = await open_dashboard(browser, http)

    await expect(page.locator("table.sites tbody tr")).to_have_count(len(SITES))
    for site in SITES:
        row = page.locator(f'table.sites tr[data-site="{site}"]')
        await expect(row.locator("[data-col=state]")).to_have_text("up")
        await expect(row).to_contain_text("H100 8 of 8 free")
        await expect(row).to_contain_text("g/kWh")

    await page.evaluate("window.notReloaded = true")  # gone if anything reloads the page
    job_id = await submit(http, "operator", "lab", name="dashboard-live")
    row = job_row(page, job_id)
    await expect(row).to_be_visible(timeout=WAIT_MS)  # from its events: nothing asks the list again otherwise
    await expect(row.locator("[data-col=state]")).to_have_text("succeeded", timeout=WAIT_MS)
    await expect(row).to_contain_text("local-fr")  # lab's residency is FR
    # its bill comes in as an event too: lab's usage this month counts the job
    await expect(page.locator('table.usage tr[data-tenant="lab"] td').first).to_have_text("1", timeout=WAIT_MS)
    # and local-fr, paid capacity, counts it as overflow by site
    await expect(page.locator('table.overflow-sites tr[data-site="local-fr"] td').first).to_have_text("1")
    assert await page.evaluate("window.notReloaded") is True
    await screenshot(page, http, tmp_path, "dashboard-overview")

    await row.get_by_role("link", name=job_id).click()
    await expect(page).to_have_url(re.compile(f"#/jobs/{job_id}$"))
    await expect(page.get_by_role("heading", level=1)).to_contain_text(job_id)
    decision = page.locator("table.decision tbody tr")
    await expect(decision).to_have_count(len(SITES))  # a row for every site of the catalog, chosen or not
    for site in SITES:
        await expect(page.locator(f'table.decision tr[data-site="{site}"] [data-col=eligible]')).to_have_text(
            re.compile("^(yes|no)$"))
    chosen = page.locator('table.decision tr[data-site="local-fr"]')
    await expect(chosen).to_have_class("chosen")
    await expect(chosen.locator("[data-col=eligible]")).to_have_text("yes")
    # cloud-se is not in France: never eligible, and the row says why
    await expect(page.locator('table.decision tr[data-site="cloud-se"] [data-col=eligible]')).to_have_text("no")
    await expect(page.locator('table.decision tr[data-site="cloud-se"]')).to_contain_text("residency FR")
    for state in ("accepted", "placed", "started", "succeeded"):
        await expect(page.locator(f'table.history tr[data-state="{state}"]')).to_have_count(1)

    async with http.client() as web:
        traceparent = (await web.get(f"/api/v1/jobs/{job_id}")).json()["traceparent"]
    trace_id = traceparent.split("-")[1]
    await expect(page.get_by_role("link", name=f"{trace_id} in Jaeger")).to_have_attribute(
        "href", f"{JAEGER}/trace/{trace_id}")
    await screenshot(page, http, tmp_path, "dashboard-job")
    assert browser.unexpected_errors == [] and browser.elsewhere(http) == []


async def test_filters_narrow_the_jobs_table_and_its_pages_follow_the_next_page_token(system, browser):
    http = await gateway_when_up(system)
    lab = [await submit(http, "operator", "lab") for _ in range(2)]
    acme = await submit(http, "operator", "acme")
    page = await open_dashboard(browser, http, path="/#/?limit=2")
    rows = page.locator("#jobs tbody tr")

    # newest first, two a page: acme's and the second of lab's, then the first of lab's
    await expect(rows).to_have_count(2)
    await expect(job_row(page, acme)).to_be_visible()
    await page.get_by_role("button", name="Older").click()
    await expect(rows).to_have_count(1)
    await expect(job_row(page, lab[0])).to_be_visible()
    await expect(page.get_by_role("button", name="Older")).to_be_disabled()
    await page.get_by_role("button", name="Newer").click()
    await expect(rows).to_have_count(2)
    await page.get_by_label("Rows a page").select_option("25")
    await expect(rows).to_have_count(3)

    # the state filter offers the contract's states
    offered = await page.locator("input[name=state]").evaluate_all("boxes => boxes.map(b => b.value)")
    assert sorted(offered) == sorted(s.value for s in JobState)

    await page.get_by_label("Tenant", exact=True).select_option("acme")
    await expect(rows).to_have_count(1)
    await expect(job_row(page, acme)).to_be_visible()
    assert "tenant=acme" in page.url  # the address keeps the filters

    await page.get_by_label("Tenant", exact=True).select_option("")
    await page.get_by_label("Site", exact=True).select_option("local-fr")
    for job_id in lab:  # lab's jobs are listed at their site once placed there
        await expect(job_row(page, job_id)).to_be_visible(timeout=WAIT_MS)
    await expect(rows).to_have_count(2)

    await page.get_by_label("Site", exact=True).select_option("")
    await page.get_by_label("failed", exact=True).check()  # none fails
    await expect(page.locator("#jobs")).to_contain_text("No job matches.")
    await page.get_by_role("button", name="Clear filters").click()
    await expect(rows).to_have_count(3)
    assert browser.unexpected_errors == []


async def test_a_tenants_token_sees_only_its_own_jobs_and_usage(system, browser, tmp_path):
    http = await gateway_when_up(system)
    if not http.secure:
        pytest.skip("an open API has no principals to keep apart (the default system has)")
    lab = await submit(http, LAB, "lab")
    acme = await submit(http, ACME, "acme")

    page = await browser.new_page()
    await page.goto(http.url + "/")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.get_by_label("Token").fill("x" * 43)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    await page.get_by_label("Token").fill(http.token(ACME) or "")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#who")).to_have_text("Acting as tenant-acme (tenant acme only)")

    await expect(job_row(page, acme)).to_be_visible()
    await expect(page.locator("#jobs tbody tr")).to_have_count(1)
    await expect(job_row(page, lab)).to_have_count(0)
    await expect(page.locator("#tenant")).to_have_count(0)  # no other tenant to choose
    await expect(page.locator("table.usage tbody tr")).to_have_count(1)
    await expect(page.locator('table.usage tr[data-tenant="acme"]')).to_be_visible()
    await screenshot(page, http, tmp_path, "dashboard-tenant")

    await page.goto(f"{http.url}/#/jobs/{lab}")
    await expect(page.get_by_role("heading", name="Job not found")).to_be_visible()
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
    # besides the 401s, the one request chromium logs as failed: lab's job, 404 to acme
    assert [e for e in browser.unexpected_errors if "status of 404" not in e] == []
