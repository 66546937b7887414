// The operator dashboard: who this tab acts as, the live event stream, and the page the address names
// (`#/` the overview, with its filters after `?`; `#/jobs/<id>` a job's page; `/?job=<id>` is taken too).

import { api, LiveEvents, Unauthorized } from "./api.js";
import { h } from "./dom.js";
import { jobPage } from "./job.js";
import { overview } from "./overview.js";

const main = document.getElementById("main");
const who = document.getElementById("who");
const liveStatus = document.getElementById("live");
const signOutButton = document.getElementById("sign-out");

let me = null;
let view = null;

const live = new LiveEvents({
  onEvent: (event) => view?.onEvent(event),
  onOpen: () => view?.refresh(),
  onStatus: showLive,
  onUnauthorized: () => signIn("Your token is no longer valid: sign in again."),
});

function showLive(state, reason, retryMs) {
  liveStatus.dataset.state = state;
  liveStatus.textContent = {
    connecting: "Connecting to live events…",
    live: "Live",
    reconnecting: `Live events interrupted (${reason}): trying again in ${Math.round(retryMs / 1000)} s`,
    stopped: "Not connected",
  }[state];
}

async function start() {
  try {
    me = await api.get("/me");
  } catch (error) {
    if (error instanceof Unauthorized) return signIn(api.token ? "Your token is no longer valid: sign in again." : "");
    main.replaceChildren(h("p", { class: "problem", role: "alert" }, `The dashboard cannot start: ${error.message}.`),
      h("button", { type: "button", onclick: start }, "Try again"));
    return;
  }
  who.replaceChildren(...(me.tenant
    ? ["Acting as ", h("strong", {}, me.principal), ` (tenant ${me.tenant} only)`]
    : me.principal === "anonymous"
      ? [h("strong", {}, "Open API"), " (every tenant)"]
      : ["Acting as ", h("strong", {}, me.principal), " (every tenant)"]));
  who.hidden = false;
  signOutButton.hidden = !api.token;
  route();
  live.start();
}

function signIn(problem) {
  live.stop();
  showLive("stopped");
  view?.close();
  view = null;
  who.hidden = signOutButton.hidden = true;
  api.forget();
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true,
    spellcheck: "false", "aria-describedby": "token-help" });
  const message = h("p", { id: "sign-in-problem", class: "problem", role: "alert" }, problem || "");
  const form = h("form", { class: "sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in"),
    h("p", { id: "token-help" }, "The API asks for a token: the one ", h("code", {}, "continuum auth init"),
      " wrote for you in ", h("code", {}, "tokens/<principal>.token"), ". This tab keeps it until it is closed or ",
      "you sign out, and sends it only in the Authorization header."),
    h("label", { for: "token" }, "Token"), input,
    h("button", { type: "submit" }, "Sign in"), message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    api.keep(input.value.trim());
    message.textContent = "";
    try {
      await api.get("/me");
    } catch (error) {
      api.forget();
      message.textContent = error instanceof Unauthorized ? "That token is not valid." : error.message;
      input.focus();
      return;
    }
    start();
  });
  main.replaceChildren(form);
  input.focus();
}

function route() {
  if (!me) return;
  const asked = new URLSearchParams(location.search).get("job");
  if (asked) {
    history.replaceState(null, "", `/#/jobs/${encodeURIComponent(asked)}`);
  }
  view?.close();
  const [path, query] = (location.hash.replace(/^#/, "") || "/").split("?");
  const job = path.match(/^\/jobs\/([^/]+)$/);
  const context = { main, me, onUnauthorized: () => signIn("Your token is no longer valid: sign in again.") };
  view = job ? jobPage(context, decodeURIComponent(job[1])) : overview(context, new URLSearchParams(query || ""));
}

signOutButton.addEventListener("click", () => signIn(""));
window.addEventListener("hashchange", route);
start();
