// Building the page: elements are made with h() and text nodes, never from HTML strings, so
// nothing the API returns (names, e-mails, file names) can become markup.

const PROPS = new Set(["value", "checked", "disabled", "selected", "hidden", "multiple", "required"]);

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (PROPS.has(key)) {
      el[key] = value;
    } else if (value !== false) {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let ids = 0;
export function uid(prefix) {
  ids += 1;
  return `${prefix}-${ids}`;
}

// A labelled input (every input has a <label for>), with an optional hint tied by aria-describedby.
export function field(labelText, input, hint) {
  input.id ||= uid("f");
  const wrap = h("div", { class: "field" }, h("label", { for: input.id }, labelText), input);
  if (hint) {
    const hintId = uid("hint");
    input.setAttribute("aria-describedby", hintId);
    wrap.append(h("p", { class: "hint", id: hintId }, hint));
  }
  return wrap;
}

export function message(kind, ...children) {
  return h("div", { class: `msg ${kind}`, role: kind === "err" ? "alert" : "status" }, ...children);
}

// A usage bar: the width is set through the CSSOM (allowed by the page's CSP, unlike a style
// attribute); the number beside it is what screen readers read.
// ``alarm``: a usage bar turns red near its limit; a share of the total never does.
export function bar(percent, alarm = true) {
  const value = Math.max(0, Math.min(100, Number(percent) || 0));
  const fill = h("span");
  fill.style.width = `${value}%`;
  return h("div", { class: alarm && value >= 90 ? "bar high" : "bar", "aria-hidden": "true" }, fill);
}

export function tableWrap(label, table) {
  // Focusable, so a keyboard user can scroll a wide table on a narrow screen.
  return h("div", { class: "table-wrap", role: "region", "aria-label": label, tabindex: "0" }, table);
}

export function table(headers, rows) {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", class: numeric(t) }, t)))),
    h("tbody", {}, rows),
  );
}

function numeric(header) {
  return /^(Version|Requests|Errors|Input|Cached|Output|Tokens|First event|Duration)/.test(header) ? "num" : null;
}

// Copies text; the Clipboard API needs a secure context (https or loopback), so on plain http
// to another host it falls back to selecting the text in its input and copying that.
export async function copyText(text, input) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    if (input) {
      input.focus();
      input.select();
      return document.execCommand("copy");
    }
    return false;
  }
}

export function copyButton(label, getText, input) {
  const state = h("span", { class: "muted", "aria-live": "polite" });
  const button = h(
    "button",
    {
      type: "button",
      class: "quiet",
      onclick: async () => {
        const ok = await copyText(getText(), input);
        state.textContent = ok ? "Copied." : "Copy failed: select the text and copy it by hand.";
      },
    },
    label,
  );
  return [button, state];
}

// A read-only text box holding something to copy (a key, a secret), with its copy button.
export function secretBox(labelText, value) {
  const input = h("input", { type: "text", readonly: true, value, spellcheck: "false", autocomplete: "off" });
  input.id = uid("secret");
  return h(
    "div",
    { class: "field secret-field" },
    h("label", { for: input.id }, labelText),
    h("div", { class: "secret" }, input, copyButton("Copy", () => value, input)),
  );
}

// Destructive actions ask first, inline (no window.confirm): the question and two buttons.
export function confirmInline(container, question, yesLabel, onYes) {
  const restore = [...container.childNodes];
  const no = h("button", { type: "button", class: "quiet", onclick: () => { replace(container, restore); } }, "Cancel");
  const yes = h("button", { type: "button", class: "danger", onclick: () => onYes() }, yesLabel);
  replace(container, h("span", { role: "alert" }, question, " "), h("span", { class: "actions" }, yes, no));
  no.focus();
}

const UNITS = [
  ["year", 365 * 86400],
  ["month", 30 * 86400],
  ["day", 86400],
  ["hour", 3600],
  ["minute", 60],
  ["second", 1],
];
const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto" });

export function relTime(iso, now = Date.now()) {
  if (!iso) return "—";
  const seconds = (Date.parse(iso) - now) / 1000;
  for (const [unit, size] of UNITS) {
    if (Math.abs(seconds) >= size || unit === "second") {
      return relative.format(Math.round(seconds / size), unit);
    }
  }
  return "";
}

const stamp = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
export function absTime(iso) {
  return iso ? stamp.format(new Date(iso)) : "—";
}

// A time element showing the relative time, the exact one in its title.
export function timeEl(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: iso, title: absTime(iso) }, relTime(iso));
}

export function num(value) {
  return value === null || value === undefined ? "—" : Number(value).toLocaleString("en");
}

export function ms(value) {
  return value === null || value === undefined ? "—" : `${Math.round(value).toLocaleString("en")} ms`;
}
