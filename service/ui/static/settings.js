// The seven settings, each beside the explanation from the settings document; saving sends the
// version it loaded (If-Match), then follows the change to every worker.
import { api, ApiError, describe } from "./api.js";
import { absTime, h, message, replace, table, tableWrap } from "./dom.js";

const POLL_MS = 250;

// In the order and words of the settings document (spec/settings-api.txt).
const TOGGLES = [
  {
    name: "sticky_threads_enabled",
    label: "Thread affinity",
    text: [
      "Keep the same account for a conversation thread.",
      "When on, requests with the same conversation thread ID are routed to the same account. This can improve conversation coherence but may lead to uneven load distribution.",
    ],
  },
  {
    name: "prefer_earlier_reset_accounts",
    label: "Prefer earlier-reset accounts",
    text: ["Prioritize accounts with earlier quota reset times when balancing the load."],
  },
  {
    name: "import_without_overwrite",
    label: "Import without overwrite",
    text: [
      "Skip importing accounts that already exist (by identity).",
      "When on, an import checks for existing identities: a matching identity is skipped (no error), which prevents duplicate accounts when re-importing the same auth.json files. When off, its tokens are replaced.",
    ],
  },
  {
    name: "totp_required_on_login",
    label: "Require TOTP on login",
    text: [
      "Require TOTP (2FA) verification on every dashboard login.",
      "First configure TOTP on the Security page, then turn this on; later logins ask for a code from your authenticator app. It cannot be turned on before TOTP is configured.",
    ],
  },
  {
    name: "api_key_auth_enabled",
    label: "Require API keys",
    text: [
      "Require a valid API key for all proxy requests.",
      "When on, every proxy endpoint (/v1/*, /backend-api/codex/*, /backend-api/transcribe) needs a valid Bearer token; /api/codex/usage stays open, and the dashboard keeps using its session. Create at least one API key first: otherwise every proxy request is refused with 401 Unauthorized.",
    ],
  },
];
const STRATEGIES = [
  ["usage_weighted", "Usage weighted", "Route to accounts with more available capacity."],
  [
    "round_robin",
    "Round robin",
    "Distribute requests evenly across all active accounts, regardless of their current usage levels. Best for testing environments, or when you want predictable distribution.",
  ],
];
const LABELS = Object.fromEntries([
  ...TOGGLES.map((t) => [t.name, t.label]),
  ["routing_strategy", "Routing strategy"],
  ["totp_configured", "TOTP configured"],
]);

export async function render(view, ctx) {
  const [{ data: current }, { data: keyList }, { data: history }] = await Promise.all([
    api("GET", "/api/settings"),
    api("GET", "/api/api-keys"),
    api("GET", "/api/settings/history"),
  ]);
  const page = { view, ctx, loaded: current, keys: keyList.api_keys, history: history.changes, confirmedKeyless: false };
  draw(page, null);
}

function usableKeys(keys) {
  const now = Date.now();
  return keys.filter((k) => k.is_active && (!k.expires_at || Date.parse(k.expires_at) > now)).length;
}

function draw(page, notice) {
  const s = page.loaded;
  const status = h("div", { id: "settings-status", "aria-live": "polite" }, notice);
  const progress = h("div", { id: "propagation", "aria-live": "polite" });
  const rows = TOGGLES.map((t) => toggleRow(t, s[t.name]));
  const form = h(
    "form",
    { id: "settings-form", novalidate: true },
    status,
    h("p", { class: "muted" }, `Version ${s.version}. Saving sends this version: if someone else saved since, nothing is overwritten.`),
    rows.slice(0, 2),
    strategyRow(s.routing_strategy),
    rows.slice(2, 4),
    totpConfiguredRow(s.totp_configured),
    rows.slice(4),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Save settings")),
    progress,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    save(page, form, status, progress);
  });
  replace(page.view, h("h1", {}, "Settings"), form, historySection(page.history));
}

function toggleRow(t, checked) {
  const id = `setting-${t.name}`;
  const input = h("input", { type: "checkbox", id, name: t.name, checked, "aria-describedby": `${id}-text` });
  return h(
    "div",
    { class: "setting" },
    h("div", { class: "control" }, input, h("label", { for: id, class: "label" }, t.label)),
    h("div", { id: `${id}-text` }, t.text.map((p) => h("p", {}, p))),
  );
}

function strategyRow(value) {
  const radios = STRATEGIES.map(([key, label, text]) => {
    const id = `setting-routing_strategy-${key}`;
    return h(
      "div",
      {},
      h("input", { type: "radio", id, name: "routing_strategy", value: key, checked: value === key }),
      h("label", { for: id }, label),
    );
  });
  return h(
    "div",
    { class: "setting" },
    h("fieldset", { class: "radios" }, h("legend", {}, "Routing strategy"), radios),
    h(
      "div",
      {},
      h("p", {}, "Load balancing strategy:"),
      h("ul", {}, STRATEGIES.map(([, label, text]) => h("li", {}, h("strong", {}, label), ": ", text))),
    ),
  );
}

function totpConfiguredRow(configured) {
  return h(
    "div",
    { class: "setting" },
    h("div", { class: "label" }, "TOTP configured"),
    h(
      "div",
      {},
      h("p", {}, "Whether TOTP has been configured for the admin user (read-only): ", h("strong", { id: "totp-configured" }, configured ? "yes" : "no"), "."),
      h("p", {}, h("a", { href: "#/security" }, configured ? "Manage TOTP" : "Set up TOTP"), " on the Security page."),
    ),
  );
}

function formValues(form) {
  const values = {};
  for (const t of TOGGLES) values[t.name] = form.elements[t.name].checked;
  values.routing_strategy = form.querySelector("input[name=routing_strategy]:checked")?.value ?? "usage_weighted";
  return values;
}

async function save(page, form, status, progress) {
  const values = formValues(form);
  const turningOnKeys = values.api_key_auth_enabled && !page.loaded.api_key_auth_enabled;
  if (turningOnKeys && usableKeys(page.keys) === 0 && !page.confirmedKeyless) {
    const go = h("button", { type: "button", class: "danger", onclick: () => { page.confirmedKeyless = true; form.requestSubmit(); } }, "Save anyway");
    replace(
      status,
      message(
        "warn",
        h("p", {}, "There is no active API key: once this is saved, every proxy request will be refused with 401 until you create one."),
        h("p", { class: "actions" }, h("a", { href: "#/keys" }, "Create an API key first"), go),
      ),
    );
    go.focus();
    return;
  }
  page.confirmedKeyless = false;
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  replace(status, message("ok", "Saving…"));
  try {
    const { data } = await api("PUT", "/api/settings", {
      json: values,
      headers: { "If-Match": `"${page.loaded.version}"` },
    });
    page.loaded = data;
    page.history = (await api("GET", "/api/settings/history")).data.changes;
    draw(page, message("ok", `Saved as version ${data.version}.`));
    follow(page, data.version);
  } catch (error) {
    button.disabled = false;
    await failed(page, status, error);
  }
}

async function failed(page, status, error) {
  if (error instanceof ApiError && error.code === "settings_conflict") {
    const { data } = await api("GET", "/api/settings");
    page.loaded = data;
    page.history = (await api("GET", "/api/settings/history")).data.changes;
    draw(
      page,
      message(
        "err",
        h("p", {}, `Someone else changed the settings while you were editing: nothing of yours was saved. The form now shows their values (version ${data.version}); make your change again and save.`),
      ),
    );
  } else if (error instanceof ApiError && error.code === "invalid_totp_config") {
    replace(
      status,
      message(
        "err",
        h("p", {}, "TOTP is not configured yet, so it cannot be required on login (invalid_totp_config). Nothing was saved."),
        h("p", {}, h("a", { href: "#/security" }, "Set up TOTP first"), ", then come back and turn this on."),
      ),
    );
  } else {
    replace(status, message("err", describe(error)));
  }
}

// "Applied on N of M workers", live until every worker has the new version.
async function follow(page, version) {
  const box = page.view.querySelector("#propagation");
  const { signal } = page.ctx;
  while (!signal.aborted) {
    let workers;
    try {
      workers = (await api("GET", "/api/settings/propagation")).data.workers;
    } catch (error) {
      replace(box, message("err", describe(error)));
      return;
    }
    const applied = workers.filter((w) => w.applied_version >= version).length;
    const all = applied === workers.length;
    replace(box, message(all ? "ok" : "warn", `Version ${version} applied on ${applied} of ${workers.length} worker${workers.length === 1 ? "" : "s"}${all ? "." : "…"}`));
    if (all) return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function historySection(changes) {
  const rows = changes.map((c) =>
    h("tr", {}, h("td", { class: "num" }, c.version), h("td", { class: "nowrap" }, absTime(c.changed_at)), h("td", {}, c.changed_fields.map((f) => LABELS[f] ?? f).join(", ") || "—")),
  );
  return h(
    "section",
    { "aria-labelledby": "history-title" },
    h("h2", { id: "history-title" }, "Change history"),
    changes.length ? tableWrap("Settings change history", table(["Version", "Changed at", "Changed"], rows)) : h("p", { class: "muted" }, "No change yet."),
  );
}
