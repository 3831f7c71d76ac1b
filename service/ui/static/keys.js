// API keys: create (the key shown once), list, rename, deactivate/reactivate, delete.
import { api, describe } from "./api.js";
import { absTime, confirmInline, field, h, message, replace, secretBox, table, tableWrap, timeEl } from "./dom.js";

export async function render(view, ctx) {
  const status = h("div", { id: "keys-status", "aria-live": "polite" });
  const created = h("div", { id: "new-key" });
  const list = h("div", { id: "key-list" });
  replace(view, h("h1", {}, "API keys"), createForm(created, list, status), created, status, h("h2", {}, "Keys"), list);
  await refresh(list, status);
}

function createForm(created, list, status) {
  const name = h("input", { type: "text", name: "name", required: true, maxlength: "100", autocomplete: "off" });
  const expiry = h("input", { type: "date", name: "expires_on" });
  const form = h(
    "form",
    { class: "panel", novalidate: true },
    field("Name", name, "Who or what uses this key, e.g. “laptop” or “CI”."),
    field("Expires on (optional)", expiry, "The key stops working at the end of this day, local time. Leave empty for no expiry."),
    h("button", { type: "submit" }, "Create key"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(status);
    if (!name.value.trim()) {
      replace(status, message("err", "Give the key a name."));
      name.focus();
      return;
    }
    const body = { name: name.value.trim() };
    if (expiry.value) body.expires_at = new Date(`${expiry.value}T23:59:59`).toISOString();
    try {
      const { data } = await api("POST", "/api/api-keys", { json: body });
      form.reset();
      showOnce(created, data);
      await refresh(list, status);
    } catch (error) {
      replace(status, message("err", describe(error)));
    }
  });
  return form;
}

// The key itself exists only in this box, until "Done": never stored, never in the URL.
function showOnce(box, data) {
  const done = h("button", { type: "button", class: "quiet", onclick: () => replace(box) }, "Done");
  replace(
    box,
    message(
      "warn",
      h("p", {}, h("strong", {}, `Key “${data.name}” created. Copy it now: you will not see it again.`)),
      secretBox("New API key", data.key),
      h("p", {}, done),
    ),
  );
  box.querySelector("input").focus();
}

function keyState(k) {
  if (!k.is_active) return h("span", { class: "pill warn" }, "inactive");
  if (k.expires_at && Date.parse(k.expires_at) <= Date.now()) return h("span", { class: "pill err" }, "expired");
  return h("span", { class: "pill ok" }, "active");
}

async function refresh(list, status) {
  const { data } = await api("GET", "/api/api-keys");
  const keys = data.api_keys;
  if (!keys.length) {
    replace(list, h("p", { class: "muted" }, "No API key yet."));
    return;
  }
  const rows = keys.map((k) => row(k, list, status));
  replace(list, tableWrap("API keys", table(["Name", "Prefix", "Status", "Created", "Expires", "Actions"], rows)));
}

function row(k, list, status) {
  const nameCell = h("td", {}, k.name);
  const actions = h("td", {}, h("div", { class: "actions" }));
  const act = async (method, body, done) => {
    try {
      await api(method, `/api/api-keys/${encodeURIComponent(k.id)}`, body === undefined ? {} : { json: body });
      replace(status, message("ok", done));
      await refresh(list, status);
    } catch (error) {
      replace(status, message("err", describe(error)));
    }
  };
  const box = actions.firstChild;
  box.append(
    h("button", { type: "button", class: "quiet", "aria-label": `Rename ${k.name}`, onclick: () => rename(k, nameCell, act) }, "Rename"),
    k.is_active
      ? h("button", { type: "button", class: "quiet", "aria-label": `Deactivate ${k.name}`, onclick: () => act("PATCH", { is_active: false }, `Key “${k.name}” deactivated.`) }, "Deactivate")
      : h("button", { type: "button", class: "quiet", "aria-label": `Reactivate ${k.name}`, onclick: () => act("PATCH", { is_active: true }, `Key “${k.name}” reactivated.`) }, "Reactivate"),
    h(
      "button",
      {
        type: "button",
        class: "danger",
        "aria-label": `Delete ${k.name}`,
        onclick: () => confirmInline(box, `Delete key “${k.name}” for good? Clients using it are refused at once.`, "Delete", () => act("DELETE", undefined, `Key “${k.name}” deleted.`)),
      },
      "Delete",
    ),
  );
  return h(
    "tr",
    { "data-key-id": k.id },
    nameCell,
    h("td", { class: "mono" }, k.key_prefix),
    h("td", {}, keyState(k)),
    h("td", { class: "nowrap" }, absTime(k.created_at)),
    h("td", { class: "nowrap" }, k.expires_at ? timeEl(k.expires_at) : "never"),
    actions,
  );
}

function rename(k, cell, act) {
  const input = h("input", { type: "text", value: k.name, maxlength: "100", "aria-label": `New name for ${k.name}` });
  const form = h(
    "form",
    { class: "actions" },
    input,
    h("button", { type: "submit" }, "Save"),
    h("button", { type: "button", class: "quiet", onclick: () => replace(cell, k.name) }, "Cancel"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act("PATCH", { name: input.value.trim() }, `Key renamed to “${input.value.trim()}”.`);
  });
  replace(cell, form);
  input.focus();
  input.select();
}
