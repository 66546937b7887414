// A job's page (`#/jobs/<id>`): where it stands, why it waits, the placement decision site by site (eligible
// or not, its reasons and holds, its score and the score's parts), its history, and its trace in Jaeger.
// Its events refresh it as they come.

import { api, Problem, Unauthorized } from "./api.js";
import { badge, coalesce, fmt, h, row, table } from "./dom.js";

const TERMINAL = new Set(["rejected", "succeeded", "failed", "cancelled"]);
const WAITING = new Set(["accepted", "queued", "requeued"]);

export function jobPage({ main, me, onUnauthorized }, jobId) {
  let closed = false;
  let shown = null;
  let focused = false;
  let notice = "";
  main.replaceChildren(h("p", { class: "loading" }, "Loading the job…"));

  async function load() {
    let record;
    try {
      record = await api.get(`/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      if (closed) return;
      if (error instanceof Unauthorized) return onUnauthorized();
      if (!(error instanceof Problem)) throw error;
      const what = error.status === 404
        ? `There is no job ${jobId}${me.tenant ? ` of tenant ${me.tenant}` : ""}.`
        : `The job cannot be shown: ${error.message}.`;
      main.replaceChildren(back(), h("h1", { tabindex: "-1" }, "Job not found"), h("p", { class: "problem", role: "alert" }, what));
      return;
    }
    const text = JSON.stringify(record);
    if (closed || text === shown) return;
    shown = text;
    render(record);
    if (!focused) main.querySelector("h1").focus();  // where a screen reader starts on a new page
    focused = true;
  }

  function render(job) {
    const spec = job.spec || {};
    const traceId = /^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$/.exec(job.traceparent || "")?.[1];
    const summary = [
      ["State", badge(job.state)],
      ["Tenant", job.tenant],
      ["Site", job.site || "–"],
      ["GPUs", spec.resources ? `${spec.resources.gpus} × ${spec.resources.gpu_type}` : "–"],
      ["Objective", spec.objective || "–"],
      ["Attempt", job.attempt],
      job.exit_code !== null && job.exit_code !== undefined ? ["Exit code", job.exit_code] : null,
      ["Submitted", fmt.time(job.history[0]?.time)],
      ["Command", h("code", {}, (spec.command || []).join(" "))],
      ["Trace", traceId
        ? (me.jaeger_url
          ? h("a", { href: `${me.jaeger_url.replace(/\/+$/, "")}/trace/${traceId}`, rel: "noreferrer", target: "_blank" },
            `${traceId} in Jaeger`)
          : h("code", {}, traceId))
        : "–"],
    ].filter(Boolean);
    const parts = [
      back(),
      h("h1", { tabindex: "-1" }, "Job ", h("span", { class: "id" }, job.job_id)),
      spec.name ? h("p", { class: "sub" }, spec.name) : null,
      h("dl", { class: "summary" }, summary.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)])),
    ];
    if (!TERMINAL.has(job.state) && job.state !== "cancelling") {
      parts.push(h("p", {}, h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel this job")));
    }
    if (notice) parts.push(h("p", { role: "status" }, notice));
    if (job.reasons?.length) {
      const title = WAITING.has(job.state) ? "Why it waits" : job.state === "failed" ? "Why it failed"
        : job.state === "rejected" ? "Why it was rejected" : "Reasons";
      parts.push(h("section", { "aria-labelledby": "reasons-title" }, h("h2", { id: "reasons-title" }, title),
        h("ul", { class: "reasons" }, job.reasons.map((r) => h("li", {}, r)))));
    }
    parts.push(decision(job.decision), history(job.history));
    main.replaceChildren(...parts.filter(Boolean));
  }

  function decision(d) {
    const section = h("section", { "aria-labelledby": "decision-title" }, h("h2", { id: "decision-title" }, "Placement decision"));
    if (!d) {
      section.append(h("p", {}, "Not placed yet: routing has not decided."));
      return section;
    }
    section.append(h("p", {},
      d.site ? ["Chosen: ", h("strong", {}, d.site), d.gpu_type ? ` (${d.gpu_type})` : "",
        d.overflow ? ": an overflow to paid capacity, public capacity could have run it" : ""]
        : d.impossible ? "No site can ever run this job." : "No site chosen: the job waits.",
      d.wait_until ? [" It waits for a greener hour, until ", fmt.time(d.wait_until), "."] : ""));
    section.append(h("div", { class: "scroll" }, table(
      "Every site of the catalog as the policy saw it: the highest score of the eligible sites wins",
      ["Site", "Eligible", "Score", "Wait", "Cost", "CO2e (kg)", "Holds", "Reasons"],
      d.candidates.map((c) => row([
        [{}, c.site, c.site === d.site ? h("span", { class: "sub" }, "chosen") : null],
        [{ dataset: { col: "eligible" } }, badge(c.eligible ? "yes" : "no", c.eligible ? "eligible" : "ineligible")],
        c.score === null || c.score === undefined ? "–" : fmt.number(c.score),
        fmt.duration(c.parts?.wait_s),
        fmt.eur(c.parts?.cost_eur),
        fmt.number(c.parts?.co2e_kg),
        c.holds?.length ? c.holds.join(", ") : "–",
        [{ class: "reasons" }, c.reasons?.length ? h("ul", {}, c.reasons.map((r) => h("li", {}, r))) : "–"],
      ], { dataset: { site: c.site }, class: c.site === d.site ? "chosen" : null })),
      { class: "decision" })));
    return section;
  }

  function history(entries) {
    return h("section", { "aria-labelledby": "history-title" }, h("h2", { id: "history-title" }, "History"),
      h("div", { class: "scroll" }, table("Each event of the job, in the order of the event stream",
        ["State", "Time", "Site", "Attempt", "Details"],
        entries.map((e) => row([
          [{}, badge(e.state)],
          fmt.time(e.time),
          e.site || "–",
          e.attempt ?? "–",
          [e.reason, e.exit_code !== undefined && e.exit_code !== null ? `exit code ${e.exit_code}` : null,
            e.refusal ? `refusal: ${e.refusal}` : null, ...(e.reasons || [])].filter(Boolean).join("; ") || "–",
        ], { dataset: { state: e.state } })), { class: "history" })));
  }

  async function cancel() {
    try {
      const reply = await api.post(`/jobs/${encodeURIComponent(jobId)}/cancel`, { reason: "cancelled from the dashboard" });
      notice = `Cancel asked: the job is ${reply.state}.`;
    } catch (error) {
      if (error instanceof Unauthorized) return onUnauthorized();
      notice = `The job was not cancelled: ${error.message}.`;
    }
    shown = null;
    refresh();
  }

  function back() {
    return h("p", { class: "back" }, h("a", { href: "#/" }, "← Overview"));
  }

  const refresh = coalesce(load, 300);
  load();
  return {
    onEvent(event) {
      if (event.subject === jobId || event.data?.job_id === jobId) refresh();
    },
    refresh,
    close() {
      closed = true;
    },
  };
}
