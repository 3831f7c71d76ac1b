// The request log (newest first, paged, three filters) and the 24 h / 7 d usage summary.
import { api, describe } from "./api.js";
import { absTime, bar, field, h, message, ms, num, replace, table, tableWrap } from "./dom.js";

const PAGE_SIZE = 50;
const STATUSES = [
  ["", "Any status"],
  ["ok", "Successful (2xx/3xx)"],
  ["error", "Errors (4xx/5xx)"],
  ["400", "400"],
  ["401", "401"],
  ["429", "429"],
  ["500", "500"],
  ["502", "502"],
  ["503", "503"],
];

export async function render(view) {
  const [{ data: keys }, { data: accounts }] = await Promise.all([api("GET", "/api/api-keys"), api("GET", "/api/accounts")]);
  const state = { before: null, older: [], filters: { api_key_id: "", account_id: "", status: "" } };
  const logBox = h("div", { id: "request-log", "aria-live": "polite" });
  const usageBox = h("div", { id: "usage-summary" });
  const filters = filterForm(keys.api_keys, accounts.accounts, state, logBox);
  replace(
    view,
    h("h1", {}, "Requests"),
    h("section", { "aria-labelledby": "log-title" }, h("h2", { id: "log-title" }, "Request log"), filters, logBox),
    h("section", { "aria-labelledby": "usage-title" }, h("h2", { id: "usage-title" }, "Usage"), usageBox),
  );
  await Promise.all([loadPage(state, logBox), usage(usageBox, "24h")]);
}

function select(name, options, value) {
  return h("select", { name }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

function filterForm(keys, accounts, state, logBox) {
  const key = select("api_key_id", [["", "Any key"], ...keys.map((k) => [k.id, k.name])], "");
  const account = select("account_id", [["", "Any account"], ...accounts.map((a) => [a.id, a.email])], "");
  const status = select("status", STATUSES, "");
  const form = h(
    "form",
    { class: "filters panel", novalidate: true },
    field("API key", key),
    field("Account", account),
    field("Status", status),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Show")),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    state.filters = { api_key_id: key.value, account_id: account.value, status: status.value };
    state.before = null;
    state.older = [];
    loadPage(state, logBox);
  });
  return form;
}

async function loadPage(state, box) {
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  for (const [name, value] of Object.entries(state.filters)) if (value) query.set(name, value);
  if (state.before) query.set("before", state.before);
  let data;
  try {
    data = (await api("GET", `/api/request-logs?${query}`)).data;
  } catch (error) {
    replace(box, message("err", describe(error)));
    return;
  }
  const newer = h("button", { type: "button", class: "quiet", disabled: state.older.length === 0 }, "Newer");
  const older = h("button", { type: "button", class: "quiet", disabled: data.next_before === null }, "Older");
  const refresh = h("button", { type: "button", class: "quiet" }, "Refresh");
  newer.addEventListener("click", () => {
    state.before = state.older.pop() ?? null;
    loadPage(state, box);
  });
  older.addEventListener("click", () => {
    state.older.push(state.before);
    state.before = data.next_before;
    loadPage(state, box);
  });
  refresh.addEventListener("click", () => loadPage(state, box));
  const rows = data.requests.map(requestRow);
  replace(
    box,
    rows.length
      ? tableWrap(
          "Request log",
          table(["Time", "Key", "Account", "Model", "Status", "First event", "Duration", "Tokens in / cached / out"], rows),
        )
      : h("p", { class: "muted" }, "No request matches."),
    h("div", { class: "actions" }, newer, older, refresh, h("span", { class: "muted" }, `Page ${state.older.length + 1}, up to ${PAGE_SIZE} a page, newest first.`)),
  );
}

function requestRow(r) {
  const ok = r.status < 400;
  return h(
    "tr",
    {},
    h("td", { class: "nowrap" }, h("time", { datetime: r.at }, absTime(r.at))),
    h("td", {}, r.api_key_name ?? h("span", { class: "muted" }, "no key")),
    h("td", {}, r.account_email ?? h("span", { class: "muted" }, "—")),
    h("td", {}, r.model ?? "—", r.stream ? h("span", { class: "hint" }, " (stream)") : null),
    h("td", {}, h("span", { class: `pill ${ok ? "ok" : "err"}` }, String(r.status)), r.error_code ? h("span", { class: "hint" }, ` ${r.error_code}`) : null),
    h("td", { class: "num" }, ms(r.first_event_ms)),
    h("td", { class: "num" }, ms(r.duration_ms)),
    h("td", { class: "num nowrap" }, `${num(r.input_tokens)} / ${num(r.cached_input_tokens)} / ${num(r.output_tokens)}`),
  );
}

async function usage(box, window) {
  const toggle = ["24h", "7d"].map((w) =>
    h("button", { type: "button", class: w === window ? "" : "quiet", "aria-pressed": String(w === window), onclick: () => usage(box, w) }, w === "24h" ? "Last 24 hours" : "Last 7 days"),
  );
  let data;
  try {
    data = (await api("GET", `/api/usage/summary?window=${window}`)).data;
  } catch (error) {
    replace(box, message("err", describe(error)));
    return;
  }
  replace(
    box,
    h("div", { class: "actions", role: "group", "aria-label": "Usage window" }, toggle),
    h("h3", {}, "Per API key"),
    usageTable("Usage per API key", data.api_keys.map((k) => [k.name ?? (k.api_key_id ? k.api_key_id : "no key"), k])),
    h("h3", {}, "Per account"),
    usageTable("Usage per account", data.accounts.map((a) => [a.email ?? a.account_id, a])),
  );
}

function usageTable(label, rows) {
  if (!rows.length) return h("p", { class: "muted" }, "No request in this window.");
  const most = Math.max(...rows.map(([, t]) => t.requests), 1);
  return tableWrap(
    label,
    table(
      ["Name", "Share", "Requests", "Errors", "Input tokens", "Cached", "Output tokens"],
      rows.map(([name, t]) =>
        h(
          "tr",
          {},
          h("td", {}, name),
          h("td", {}, bar((100 * t.requests) / most, false)),
          h("td", { class: "num" }, num(t.requests)),
          h("td", { class: "num" }, num(t.errors)),
          h("td", { class: "num" }, num(t.input_tokens)),
          h("td", { class: "num" }, num(t.cached_input_tokens)),
          h("td", { class: "num" }, num(t.output_tokens)),
        ),
      ),
    ),
  );
}
