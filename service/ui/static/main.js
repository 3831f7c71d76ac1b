// The page's router: hash routes (#/accounts, #/settings...), the session check in front of
// them, and the way back to the page the user was on after a login.
import { api, describe, onSessionLost } from "./api.js";
import { h, message, replace } from "./dom.js";
import * as accounts from "./accounts.js";
import * as clients from "./clients.js";
import * as keys from "./keys.js";
import * as login from "./login.js";
import * as logs from "./logs.js";
import * as security from "./security.js";
import * as settings from "./settings.js";

const PAGES = {
  "/accounts": accounts,
  "/keys": keys,
  "/logs": logs,
  "/settings": settings,
  "/security": security,
  "/clients": clients,
};
const HOME = "/accounts";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const flashBox = document.getElementById("flash");
const logoutButton = document.getElementById("logout");

let session = null;
let current = null; // the page being shown: its AbortController stops its timers and fetches
let pendingFlash = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || HOME;
  const [path, query = ""] = raw.split("?");
  return { path, params: new URLSearchParams(query) };
}

export function navigate(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function flash(kind, text) {
  pendingFlash = text === null ? null : { kind, text };
}

function showFlash() {
  replace(flashBox, pendingFlash ? message(pendingFlash.kind, pendingFlash.text) : null);
  pendingFlash = null;
}

function loginHash(next) {
  return next && next !== "/login" ? `#/login?next=${encodeURIComponent(next)}` : "#/login";
}

async function refreshSession() {
  session = (await api("GET", "/api/dashboard-auth/session")).data;
  return session;
}

function chrome(loggedIn, path) {
  nav.hidden = !loggedIn;
  logoutButton.hidden = !loggedIn;
  for (const link of nav.querySelectorAll("a")) {
    if (link.getAttribute("href") === `#${path}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function render() {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const { path, params } = parseHash();
  try {
    if (session === null) await refreshSession();
    if (controller.signal.aborted) return;
    const page = PAGES[path];
    if (path === "/login" || !session.authenticated) {
      if (path !== "/login") {
        navigate(loginHash(path));
        return;
      }
      chrome(false, path);
      showFlash();
      await login.render(view, {
        session,
        signal: controller.signal,
        refreshSession,
        done: () => {
          const next = params.get("next");
          navigate(`#${next && PAGES[next] ? next : HOME}`);
        },
      });
    } else if (!page) {
      navigate(`#${HOME}`);
      return;
    } else {
      chrome(true, path);
      showFlash();
      await page.render(view, { session, signal: controller.signal, refreshSession, navigate, params });
    }
  } catch (error) {
    if (controller.signal.aborted) return;
    replace(view, h("h1", {}, "codex-lb"), message("err", describe(error)));
  }
  if (controller.signal.aborted) return;
  document.title = `${view.querySelector("h1")?.textContent ?? "Dashboard"} · codex-lb`;
  markReady();
}

let ready = false;
function markReady() {
  if (ready) return;
  ready = true;
  // Tests read these: the first view is on screen and usable, and when that happened.
  document.documentElement.dataset.readyMs = String(Math.round(performance.now()));
  document.documentElement.dataset.ready = "true";
}

onSessionLost((error) => {
  if (session) session = { ...session, authenticated: false };
  const { path } = parseHash();
  if (path === "/login") return;
  flash("warn", error.code === "totp_required" ? describe(error) : "Your session has expired. Log in again to go on where you were.");
  session = null;
  navigate(loginHash(path));
});

logoutButton.addEventListener("click", async () => {
  try {
    await api("POST", "/api/dashboard-auth/logout");
    flash("ok", "You are logged out.");
  } catch (error) {
    flash("err", describe(error));
  }
  session = null;
  navigate("#/login");
});

window.addEventListener("hashchange", () => {
  render().then(() => view.focus({ preventScroll: true }));
});
render();
