// The password and TOTP: change the password; set TOTP up (QR code and secret, shown for this
// enrolment only), confirm it with a code, or disable it with a code.
import { api, describe } from "./api.js";
import { field, h, message, replace, secretBox } from "./dom.js";

export async function render(view, ctx) {
  const session = await ctx.refreshSession();
  const totp = h("section", { "aria-labelledby": "totp-title" });
  replace(
    view,
    h("h1", {}, "Security"),
    h("section", { "aria-labelledby": "password-title" }, h("h2", { id: "password-title" }, "Change the password"), passwordForm()),
    totp,
  );
  drawTotp(totp, session, ctx);
}

function submitting(form, status, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    replace(status);
    try {
      await action();
    } catch (error) {
      replace(status, message("err", describe(error)));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function passwordForm() {
  const current = h("input", { type: "password", name: "current_password", autocomplete: "current-password", required: true });
  const next = h("input", { type: "password", name: "new_password", autocomplete: "new-password", required: true, minlength: "8" });
  const again = h("input", { type: "password", name: "new_password_again", autocomplete: "new-password", required: true });
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "panel", novalidate: true },
    status,
    field("Current password", current),
    field("New password", next, "8 to 1024 characters. Every other session is logged out."),
    field("Repeat the new password", again),
    h("button", { type: "submit" }, "Change password"),
  );
  return submitting(form, status, async () => {
    if (next.value.length < 8) throw new Error("The new password needs at least 8 characters.");
    if (next.value !== again.value) throw new Error("The two new passwords differ.");
    await api("POST", "/api/dashboard-auth/password/change", {
      json: { current_password: current.value, new_password: next.value },
    });
    form.reset();
    replace(status, message("ok", "Password changed. Every other session has been logged out."));
  });
}

function codeInput(name) {
  return h("input", { type: "text", name, inputmode: "numeric", autocomplete: "one-time-code", pattern: "[0-9]{6}", maxlength: "6", required: true });
}

function drawTotp(box, session, ctx, notice) {
  const title = h("h2", { id: "totp-title" }, "Two-factor authentication (TOTP)");
  if (session.totp_configured) {
    const code = codeInput("disable_code");
    const status = h("div", { "aria-live": "polite" });
    const form = h(
      "form",
      { class: "panel", novalidate: true },
      status,
      field("Code to disable TOTP", code, "Disabling TOTP also turns off “Require TOTP on login”."),
      h("button", { type: "submit", class: "danger" }, "Disable TOTP"),
    );
    submitting(form, status, async () => {
      await api("POST", "/api/dashboard-auth/totp/disable", { json: { code: code.value.trim() } });
      drawTotp(box, await ctx.refreshSession(), ctx, message("ok", "TOTP is disabled."));
    });
    const required = session.totp_required_on_login
      ? "Logins ask for a code."
      : h("span", {}, "Logins do not ask for a code yet: turn on “Require TOTP on login” in ", h("a", { href: "#/settings" }, "Settings"), ".");
    replace(box, title, notice, h("p", {}, "TOTP is configured. ", required), form);
    return;
  }
  const start = h("button", { type: "button" }, "Set up TOTP");
  const status = h("div", { "aria-live": "polite" });
  start.addEventListener("click", async () => {
    start.disabled = true;
    try {
      const { data } = await api("POST", "/api/dashboard-auth/totp/setup/start");
      enrol(box, title, data, ctx);
    } catch (error) {
      start.disabled = false;
      replace(status, message("err", describe(error)));
    }
  });
  replace(
    box,
    title,
    notice,
    status,
    h("p", {}, "TOTP is not configured. Set it up to ask for a code from an authenticator app at login."),
    start,
  );
}

function enrol(box, title, data, ctx) {
  const code = codeInput("confirm_code");
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "panel", novalidate: true },
    status,
    field("Code from the app", code, "Enter the 6-digit code the app now shows, to check it is set up right."),
    h("button", { type: "submit" }, "Confirm and enable"),
  );
  submitting(form, status, async () => {
    await api("POST", "/api/dashboard-auth/totp/setup/confirm", { json: { code: code.value.trim() } });
    drawTotp(box, await ctx.refreshSession(), ctx, message("ok", "TOTP is configured."));
  });
  replace(
    box,
    title,
    h("p", {}, "Scan this QR code with your authenticator app, or enter the secret by hand. Both are shown only now."),
    h("img", { class: "qr", src: data.qr_svg_data_uri, alt: "QR code of the TOTP secret for your authenticator app", width: "208", height: "208" }),
    secretBox("Secret", data.secret),
    form,
  );
  code.focus();
}
