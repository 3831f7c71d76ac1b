// Accounts: import auth.json files (picker or drag and drop), the list with both usage windows,
// pause, resume, delete.
import { api, describe } from "./api.js";
import { bar, confirmInline, h, message, replace, table, tableWrap, timeEl } from "./dom.js";

export async function render(view) {
  const status = h("div", { id: "accounts-status", "aria-live": "polite" });
  const results = h("div", { id: "import-results", "aria-live": "polite" });
  const list = h("div", { id: "account-list" });
  replace(view, h("h1", {}, "Accounts"), importForm(results, list, status), results, h("h2", {}, "Pool"), status, list);
  await refresh(list, status);
}

function importForm(results, list, status) {
  const input = h("input", { type: "file", id: "import-files", name: "auth_json", multiple: true, accept: ".json,application/json" });
  const chosen = h("p", { class: "hint", id: "import-chosen" }, "No file chosen.");
  let files = [];
  const choose = (list) => {
    files = [...list];
    chosen.textContent = files.length ? `${files.length} file${files.length === 1 ? "" : "s"}: ${files.map((f) => f.name).join(", ")}` : "No file chosen.";
  };
  input.addEventListener("change", () => choose(input.files));
  const drop = h(
    "div",
    { class: "drop" },
    h("label", { for: input.id, class: "label" }, "auth.json files"),
    h("p", { class: "hint" }, "Choose one or more Codex CLI ~/.codex/auth.json files, or drop them here."),
    input,
    chosen,
  );
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files);
  });
  const form = h("form", { class: "panel", novalidate: true }, h("h2", {}, "Import"), drop, h("button", { type: "submit" }, "Import"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!files.length) {
      replace(results, message("err", "Choose at least one auth.json file."));
      return;
    }
    const body = new FormData();
    for (const file of files) body.append("auth_json", file, file.name);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const { data } = await api("POST", "/api/accounts/import", { body });
      replace(results, importTable(data.results));
      input.value = "";
      choose([]);
      await refresh(list, status);
    } catch (error) {
      replace(results, message("err", h("p", {}, "Nothing was imported: ", describe(error))));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

const OUTCOME = { created: "ok", updated: "ok", skipped: "warn" };

function importTable(rows) {
  return h(
    "div",
    {},
    message("ok", `Imported ${rows.length} file${rows.length === 1 ? "" : "s"}.`),
    tableWrap(
      "Import results",
      table(
        ["File", "Result", "Account"],
        rows.map((r) => h("tr", {}, h("td", {}, r.filename), h("td", {}, h("span", { class: `pill ${OUTCOME[r.status] ?? "warn"}` }, r.status)), h("td", {}, r.account.email))),
      ),
    ),
  );
}

function statusCell(a) {
  switch (a.status) {
    case "active":
      return h("span", { class: "pill ok" }, "active");
    case "paused":
      return h("span", { class: "pill warn" }, "paused");
    case "rate_limited":
      return h("span", {}, h("span", { class: "pill warn" }, "rate-limited"), " until ", timeEl(a.primary_reset_at));
    case "quota_exceeded":
      return h("span", {}, h("span", { class: "pill err" }, "weekly limit reached"), " until ", timeEl(a.secondary_reset_at));
    case "reauth_required":
      return h("span", {}, h("span", { class: "pill err" }, "re-auth needed"), h("br"), h("span", { class: "hint" }, "Log in with the Codex CLI again and re-import its auth.json."));
    default:
      return h("span", { class: "pill warn" }, a.status);
  }
}

function windowCell(percent, resetAt) {
  if (percent === null || percent === undefined) return h("td", { class: "muted" }, "not known yet");
  return h(
    "td",
    {},
    bar(percent),
    h("span", { class: "nowrap" }, `${Math.round(percent)}% used`),
    resetAt ? h("span", { class: "hint nowrap" }, h("br"), "resets ", timeEl(resetAt)) : null,
  );
}

async function refresh(list, status) {
  const { data } = await api("GET", "/api/accounts");
  if (!data.accounts.length) {
    replace(list, h("p", { class: "muted" }, "No account yet: import an auth.json above."));
    return;
  }
  const rows = data.accounts.map((a) => row(a, list, status));
  replace(list, tableWrap("Accounts", table(["Account", "Status", "5-hour window", "Weekly window", "Last used", "Actions"], rows)));
}

function row(a, list, status) {
  const box = h("div", { class: "actions" });
  const act = async (method, path, done) => {
    try {
      await api(method, `/api/accounts/${encodeURIComponent(a.id)}${path}`);
      replace(status, message("ok", done));
      await refresh(list, status);
    } catch (error) {
      replace(status, message("err", describe(error)));
    }
  };
  box.append(
    a.status === "paused"
      ? h("button", { type: "button", class: "quiet", "aria-label": `Resume ${a.email}`, onclick: () => act("POST", "/resume", `${a.email} resumed.`) }, "Resume")
      : h("button", { type: "button", class: "quiet", "aria-label": `Pause ${a.email}`, onclick: () => act("POST", "/pause", `${a.email} paused.`) }, "Pause"),
    h(
      "button",
      {
        type: "button",
        class: "danger",
        "aria-label": `Delete ${a.email}`,
        onclick: () => confirmInline(box, `Remove ${a.email} from the pool?`, "Delete", () => act("DELETE", "", `${a.email} deleted.`)),
      },
      "Delete",
    ),
  );
  return h(
    "tr",
    { "data-account-id": a.id },
    h("td", {}, a.email, h("br"), h("span", { class: "hint" }, a.plan_type || "plan unknown")),
    h("td", {}, statusCell(a)),
    windowCell(a.primary_used_percent, a.primary_reset_at),
    windowCell(a.secondary_used_percent, a.secondary_reset_at),
    h("td", { class: "nowrap" }, timeEl(a.last_used_at)),
    h("td", {}, box),
  );
}
