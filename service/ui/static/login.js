// First run (bootstrap token + password), password login, and the TOTP step.
import { api, describe } from "./api.js";
import { field, h, message, replace } from "./dom.js";

export async function render(view, ctx) {
  const { session } = ctx;
  if (session.authenticated) {
    ctx.done();
    return;
  }
  if (!session.password_configured) firstRun(view, ctx);
  else if (session.totp_pending) totpStep(view, ctx);
  else passwordStep(view, ctx);
}

function form(onSubmit, ...children) {
  const status = h("div", { "aria-live": "polite" });
  const el = h("form", { class: "panel", novalidate: true }, status, ...children);
  el.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = el.querySelector("button[type=submit]");
    button.disabled = true;
    replace(status);
    try {
      await onSubmit();
    } catch (error) {
      replace(status, message("err", describe(error)));
      el.querySelector("input")?.focus();
    } finally {
      button.disabled = false;
    }
  });
  return el;
}

function password(name, autocomplete) {
  return h("input", { type: "password", name, autocomplete, required: true, minlength: "8", maxlength: "1024" });
}

function firstRun(view, ctx) {
  const token = h("input", { type: "password", name: "bootstrap_token", autocomplete: "off", required: true });
  const pass = password("password", "new-password");
  const again = password("password_again", "new-password");
  const el = form(
    async () => {
      if (pass.value.length < 8) throw new Error("The password needs at least 8 characters.");
      if (pass.value !== again.value) throw new Error("The two passwords differ.");
      await api("POST", "/api/dashboard-auth/password/setup", {
        json: { password: pass.value, bootstrap_token: token.value.trim() },
      });
      await ctx.refreshSession();
      ctx.done();
    },
    field(
      "Bootstrap token",
      token,
      "Printed once in the server log (a WARNING line) when codex-lb first started; run `codex-lb admin bootstrap-token` on the server to see it again. If CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN is set, it is that value.",
    ),
    field("New password", pass, "8 to 1024 characters. A long passphrase is best."),
    field("Repeat the password", again),
    h("button", { type: "submit" }, "Set password and log in"),
  );
  replace(view, h("h1", {}, "Welcome to codex-lb"), h("p", {}, "Set the dashboard password to finish the first run."), el);
  token.focus();
}

function passwordStep(view, ctx) {
  const pass = h("input", { type: "password", name: "password", autocomplete: "current-password", required: true });
  const el = form(
    async () => {
      const { data } = await api("POST", "/api/dashboard-auth/password/login", { json: { password: pass.value } });
      pass.value = "";
      await ctx.refreshSession();
      if (data.totp_pending) totpStep(view, ctx);
      else ctx.done();
    },
    field("Password", pass),
    h("button", { type: "submit" }, "Log in"),
  );
  replace(view, h("h1", {}, "Log in"), el);
  pass.focus();
}

function totpStep(view, ctx) {
  const code = h("input", {
    type: "text",
    name: "code",
    inputmode: "numeric",
    autocomplete: "one-time-code",
    pattern: "[0-9]{6}",
    maxlength: "6",
    required: true,
  });
  const el = form(
    async () => {
      await api("POST", "/api/dashboard-auth/totp/verify", { json: { code: code.value.trim() } });
      await ctx.refreshSession();
      ctx.done();
    },
    field("Authenticator code", code, "The 6-digit code your authenticator app shows for codex-lb."),
    h("button", { type: "submit" }, "Verify"),
  );
  replace(view, h("h1", {}, "Two-factor check"), h("p", {}, "Password accepted."), el);
  code.focus();
}
