// The overview (`#/`): the sites now, each tenant's usage this month, and the jobs, filtered and paged; kept
// live by the event stream (a job's events refresh the page of jobs shown, a site's the sites, a bill the usage).

import { api, Problem, Unauthorized } from "./api.js";
import { badge, coalesce, fmt, h, row, table } from "./dom.js";

// JobState (shared/contracts/jobs.py), in the order a job goes through them
export const STATES = ["accepted", "queued", "placed", "dispatched", "started", "succeeded", "failed",
  "cancelling", "cancelled", "requeued", "rejected"];
const PAGE_SIZES = [10, 25, 50, 100];
const SITES_EVERY_MS = 5000;  // GPUs free change with every heartbeat, which is no event: asked again this often

export function overview({ main, me, onUnauthorized }, params) {
  const filters = {
    tenant: me.tenant ? null : params.get("tenant"),
    site: params.get("site"),
    states: params.getAll("state").filter((s) => STATES.includes(s)),
    limit: Math.min(Math.max(Number(params.get("limit")) || 25, 1), 500),
  };
  // the token of each page seen so far (the first page has none): "Newer" goes back through them
  let tokens = [null];
  let page = 0;
  let sites = [];
  let closed = false;
  let asked = 0;  // which filters a page of jobs answers: one for filters changed since is not shown

  const sitesPart = h("section", { "aria-labelledby": "sites-title" }, h("h2", { id: "sites-title" }, "Sites"),
    h("p", { class: "loading" }, "Loading sites…"));
  const usagePart = h("section", { "aria-labelledby": "usage-title" });
  const jobsPart = h("section", { id: "jobs", "aria-labelledby": "jobs-title" });
  main.replaceChildren(h("h1", { class: "visually-hidden" }, "Overview"), sitesPart, usagePart, jobsPart);

  // each part says its own problems, and a token gone bad sends the tab back to sign in
  const guarded = (load, where) => async () => {
    if (closed) return;
    try {
      await load();
      where().querySelector(":scope > .problem")?.remove();
    } catch (error) {
      if (error instanceof Unauthorized) return onUnauthorized();
      if (!(error instanceof Problem)) throw error;
      const note = where().querySelector(":scope > .problem") || where().appendChild(h("p", { class: "problem",
        role: "alert" }));
      note.textContent = `Not up to date: ${error.message}.`;
    }
  };

  // ---- sites
  async function loadSites() {
    ({ sites } = await api.get("/sites"));
    if (closed) return;
    sitesPart.replaceChildren(h("h2", { id: "sites-title" }, "Sites"), table("Every site of the catalog, now",
      ["Site", "State", "GPUs free of total", "Queued / running", "Forecast wait", "Carbon now", "Price"],
      sites.map((s) => row([
        [{}, s.site_id, h("span", { class: "sub" }, `${s.kind.replace("_", " ")}, ${s.country}`)],
        [{ dataset: { col: "state" } }, badge(s.state), s.saturated ? badge("saturated") : null],
        [{}, Object.entries(s.gpus).map(([type, g]) => gpuBar(type, g))],
        `${s.queued} / ${s.running}`,
        fmt.duration(s.est_wait_s),
        `${fmt.number(s.carbon_g_per_kwh)} g/kWh`,
        [{}, Object.entries(s.price_eur_per_gpu_hour).map(([type, eur]) => h("div", {}, `${type} ${fmt.eur(eur)}/h`))],
      ], { dataset: { site: s.site_id } })), { class: "sites" }));
    siteChoices();
  }

  function gpuBar(type, g) {
    const free = h("span");
    free.style.width = `${g.total ? (100 * g.free) / g.total : 0}%`;  // set as a property: the page allows no inline style
    return h("div", { class: "gpus" },
      h("span", {}, `${type} `, h("strong", {}, g.free), ` of ${g.total} free`),
      h("span", { class: "bar", "aria-hidden": "true" }, free));
  }

  // ---- usage this month, by tenant
  async function loadUsage() {
    if (!sites.length) await loadSites();
    const now = new Date();
    const since = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
    const month = since.toLocaleString("en-GB", { month: "long", year: "numeric", timeZone: "UTC" });
    const statements = await Promise.all(me.tenants.map((t) =>
      api.get(`/tenants/${encodeURIComponent(t)}/statement`, { since: since.toISOString() })));
    if (closed) return;
    // overflow goes from publicly funded capacity to paid capacity: usage on a site that is not public HPC
    const paid = new Set(sites.filter((s) => s.kind !== "public_hpc").map((s) => s.site_id));
    const sums = statements.map((st) => {
      const overflow = st.lines.filter((l) => paid.has(l.site));
      return { tenant: st.tenant, jobs: st.lines.length, ...st.totals,
        overflow_gpu_hours: overflow.reduce((sum, l) => sum + l.gpu_hours, 0),
        overflow_eur: overflow.reduce((sum, l) => sum + l.amount_eur, 0) };
    });
    const cells = (u) => [u.jobs, fmt.number(u.gpu_hours), fmt.eur(u.amount_eur), fmt.number(u.overflow_gpu_hours),
      fmt.eur(u.overflow_eur), fmt.number(u.energy_kwh), fmt.number(u.co2e_kg)];
    const total = sums.reduce((t, u) => Object.fromEntries(Object.keys(t).map((k) => [k, t[k] + u[k]])),
      { jobs: 0, gpu_hours: 0, amount_eur: 0, overflow_gpu_hours: 0, overflow_eur: 0, energy_kwh: 0, co2e_kg: 0 });
    const usage = table(`Billed since 1 ${month} (UTC), jobs that ended`,
      ["Tenant", "Jobs", "GPU-hours", "Cost", "Overflow GPU-hours", "Overflow cost", "Energy (kWh)", "CO2e (kg)"],
      sums.map((u) => row([u.tenant, ...cells(u)], { dataset: { tenant: u.tenant } })), { class: "usage" });
    if (sums.length > 1) usage.append(h("tfoot", {}, row(["Every tenant", ...cells(total)])));
    // where the overflow went: each paid site's share of it, every tenant shown here together
    const bySite = new Map();
    for (const line of statements.flatMap((st) => st.lines).filter((l) => paid.has(l.site))) {
      const s = bySite.get(line.site) ?? { jobs: 0, gpu_hours: 0, amount_eur: 0, co2e_kg: 0 };
      bySite.set(line.site, { jobs: s.jobs + 1, gpu_hours: s.gpu_hours + line.gpu_hours,
        amount_eur: s.amount_eur + line.amount_eur, co2e_kg: s.co2e_kg + line.co2e_kg });
    }
    const overflowBySite = table(`Overflow by site since 1 ${month} (UTC)`,
      ["Site", "Jobs", "GPU-hours", "Cost", "CO2e (kg)"],
      [...bySite].map(([site, s]) => row([site, s.jobs, fmt.number(s.gpu_hours), fmt.eur(s.amount_eur),
        fmt.number(s.co2e_kg)], { dataset: { site } })), { class: "overflow-sites" });
    usagePart.replaceChildren(h("h2", { id: "usage-title" }, `Usage in ${month}`), usage,
      h("p", { class: "note" }, "Overflow: usage on paid capacity (a site that is not public HPC: private cloud, partner)."),
      overflowBySite);
  }

  // ---- jobs
  const tenantChoice = me.tenant
    ? h("p", { class: "fixed" }, "Tenant ", h("strong", {}, me.tenant))
    : labelled("tenant", "Tenant", h("select", { id: "tenant", onchange: (e) => changed({ tenant: e.target.value }) },
      h("option", { value: "" }, "Every tenant"),
      me.tenants.map((t) => h("option", { value: t, selected: t === filters.tenant }, t))));
  const siteSelect = h("select", { id: "site", onchange: (e) => changed({ site: e.target.value }) });
  const stateBoxes = STATES.map((s) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "state", value: s, checked: filters.states.includes(s),
      onchange: () => changed({ states: stateBoxes.map((l) => l.firstChild).filter((c) => c.checked).map((c) => c.value) }) }),
    ` ${s}`));
  const sizeSelect = h("select", { id: "limit", onchange: (e) => changed({ limit: Number(e.target.value) }) },
    [...new Set([...PAGE_SIZES, filters.limit])].sort((a, b) => a - b)
      .map((n) => h("option", { value: n, selected: n === filters.limit }, n)));
  const jobsTable = h("div", { class: "scroll" });
  const pageLabel = h("span", { "aria-live": "polite" });
  const newer = h("button", { type: "button", onclick: () => turn(-1) }, "← Newer");
  const older = h("button", { type: "button", onclick: () => turn(1) }, "Older →");
  jobsPart.replaceChildren(
    h("h2", { id: "jobs-title" }, "Jobs"),
    h("form", { class: "filters", role: "search", "aria-label": "Filter jobs", onsubmit: (e) => e.preventDefault() },
      tenantChoice, labelled("site", "Site", siteSelect),
      h("fieldset", {}, h("legend", {}, "State (none ticked: any)"), stateBoxes),
      labelled("limit", "Rows a page", sizeSelect),
      h("button", { type: "button", class: "quiet", onclick: clear }, "Clear filters")),
    jobsTable,
    h("nav", { class: "pager", "aria-label": "Pages of jobs" }, newer, pageLabel, older));
  siteChoices();

  function labelled(id, text, control) {
    return h("div", { class: "field" }, h("label", { for: id }, text), control);
  }

  function siteChoices() {
    const ids = [...new Set([...sites.map((s) => s.site_id), filters.site].filter(Boolean))];
    if (siteSelect.dataset.ids === ids.join(" ")) return;  // as they were: a select being used stays as it is
    siteSelect.dataset.ids = ids.join(" ");
    siteSelect.replaceChildren(h("option", { value: "" }, "Every site"),
      ...ids.map((id) => h("option", { value: id, selected: id === filters.site }, id)));
  }

  function changed(change) {
    Object.assign(filters, change);
    const query = new URLSearchParams();
    if (filters.tenant) query.set("tenant", filters.tenant);
    if (filters.site) query.set("site", filters.site);
    for (const s of filters.states) query.append("state", s);
    if (filters.limit !== 25) query.set("limit", filters.limit);
    // the address keeps the filters (a link to share), without a new page in the history for each
    history.replaceState(null, "", `#/${query.toString() ? `?${query}` : ""}`);
    tokens = [null];
    page = 0;
    asked += 1;
    refreshJobs();
  }

  function clear() {
    for (const box of stateBoxes) box.firstChild.checked = false;
    siteSelect.value = "";
    sizeSelect.value = "25";
    if (!me.tenant) jobsPart.querySelector("#tenant").value = "";
    changed({ tenant: null, site: null, states: [], limit: 25 });
  }

  function turn(by) {
    page = Math.max(0, page + by);
    refreshJobs();
  }

  async function loadJobs() {
    const [shown, filtered] = [page, asked];
    const answer = await api.get("/jobs", { tenant: filters.tenant, site: filters.site, state: filters.states,
      limit: filters.limit, page_token: tokens[shown] });
    if (closed || shown !== page || filtered !== asked) return;
    tokens = tokens.slice(0, shown + 1);
    if (answer.next_page_token) tokens.push(answer.next_page_token);
    newer.disabled = shown === 0;
    older.disabled = !answer.next_page_token;
    pageLabel.textContent = `Page ${shown + 1}`;
    jobsTable.replaceChildren(answer.jobs.length
      ? table(`Jobs, newest first: ${answer.jobs.length} on this page`,
        ["Job", "Tenant", "State", "Site", "GPUs", "Submitted", "Last change"],
        answer.jobs.map(jobRow), { class: "jobs" })
      : h("p", { class: "empty" }, "No job matches."));
  }

  function jobRow(job) {
    const resources = job.spec?.resources;
    const first = job.history[0];
    const last = job.history[job.history.length - 1];
    return row([
      [{}, h("a", { href: `#/jobs/${encodeURIComponent(job.job_id)}`, class: "id" }, job.job_id),
        job.spec?.name ? h("span", { class: "sub" }, job.spec.name) : null],
      job.tenant,
      [{ dataset: { col: "state" } }, badge(job.state)],
      job.site || "–",
      resources ? `${resources.gpus} × ${resources.gpu_type}` : "–",
      fmt.time(first?.time),
      fmt.time(last?.time),
    ], { dataset: { job: job.job_id } });
  }

  const refreshSites = coalesce(guarded(loadSites, () => sitesPart), 1000);
  const refreshUsage = coalesce(guarded(loadUsage, () => usagePart), 1000);
  const refreshJobs = coalesce(guarded(loadJobs, () => jobsPart), 300);
  const polling = setInterval(refreshSites, SITES_EVERY_MS);
  refreshSites();
  refreshUsage();
  refreshJobs();

  return {
    onEvent(event) {
      const type = event.type || "";
      if (type.startsWith("continuum.job.")) refreshJobs();
      else if (type.startsWith("continuum.site.")) refreshSites();
      else if (type.startsWith("continuum.billing.")) refreshUsage();
    },
    refresh() {
      refreshSites();
      refreshUsage();
      refreshJobs();
    },
    close() {
      closed = true;
      clearInterval(polling);
    },
  };
}
