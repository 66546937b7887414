// Building the page: elements from data (text is always text: nothing the API returns is parsed as markup),
// and the few ways numbers and times are shown.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

// a table: a caption, column headings, and rows of cells (a cell is text, an element or [attrs, ...content])
export function table(caption, headings, rows, attrs = {}) {
  return h("table", attrs,
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, headings.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows));
}

export function row(cells, attrs = {}) {
  return h("tr", attrs, cells.map((cell, i) => {
    const [cellAttrs, ...content] = Array.isArray(cell) ? cell : [{}, cell];
    return h(i === 0 ? "th" : "td", i === 0 ? { scope: "row", ...cellAttrs } : cellAttrs, content);
  }));
}

export function badge(text, kind = text) {
  return h("span", { class: "badge", dataset: { kind } }, text);
}

const number = new Intl.NumberFormat("en", { maximumFractionDigits: 2 });
const small = new Intl.NumberFormat("en", { maximumSignificantDigits: 2 });
const money = new Intl.NumberFormat("en", { style: "currency", currency: "EUR" });
const smallMoney = new Intl.NumberFormat("en", { style: "currency", currency: "EUR", maximumSignificantDigits: 2 });
// a job of a few seconds uses a few thousandths of a GPU-hour: shown as that, not as 0
const isSmall = (n) => n !== 0 && Math.abs(n) < 0.01;
const two = (n) => String(n).padStart(2, "0");

export const fmt = {
  number: (n) => (n === null || n === undefined ? "–" : (isSmall(n) ? small : number).format(n)),
  eur: (n) => (n === null || n === undefined ? "–" : (isSmall(n) ? smallMoney : money).format(n)),
  duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.round(s / 60)} min`;
    const hours = Math.floor(s / 3600);
    const minutes = Math.round((s % 3600) / 60);
    return minutes ? `${hours} h ${minutes} min` : `${hours} h`;
  },
  // a moment on the reader's clock, year first (no day-month ambiguity), with the exact time in UTC on hover
  time(iso) {
    if (!iso) return "–";
    const at = new Date(iso);
    const shown = `${at.getFullYear()}-${two(at.getMonth() + 1)}-${two(at.getDate())} `
      + `${two(at.getHours())}:${two(at.getMinutes())}:${two(at.getSeconds())}`;
    return h("time", { datetime: iso, title: at.toISOString() }, shown);
  },
};

// run `fn` at most once every `ms`, the last call never lost: for views that many events ask to refresh
export function coalesce(fn, ms) {
  let timer = null;
  let running = null;
  let again = false;
  const run = async () => {
    timer = null;
    if (running) { again = true; return; }
    running = (async () => {
      try { await fn(); } catch (error) { console.error(error); }  // a view shows its own problems
      running = null;
      if (again) { again = false; schedule(); }
    })();
  };
  const schedule = () => { if (!timer) timer = setTimeout(run, ms); };
  return schedule;
}
