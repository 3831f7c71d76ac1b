// The one way the page talks to codex-lb: same-origin fetch of the documented /api/* routes.
// The session lives in the HttpOnly cookie only; nothing is kept in localStorage,
// sessionStorage or the URL.

export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

let sessionLost = () => {};

// Called when the server says the session is gone (expired, logged out elsewhere, password
// changed) or still owes the TOTP step: the page goes back to the login form.
export function onSessionLost(handler) {
  sessionLost = handler;
}

export async function api(method, path, { json, body, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, cache: "no-store", credentials: "same-origin" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network_error", "codex-lb could not be reached. Is it running?", null);
  }
  const text = response.status === 204 ? "" : await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data?.error ?? {};
    const retry = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
    const failure = new ApiError(
      response.status,
      error.code ?? `http_${response.status}`,
      error.message ?? `The server answered ${response.status}.`,
      Number.isFinite(retry) ? retry : null,
    );
    if (failure.code === "unauthorized" || failure.code === "totp_required") sessionLost(failure);
    throw failure;
  }
  return { data, headers: response.headers, status: response.status };
}

function waitWords(seconds) {
  if (seconds === null) return "a little while";
  if (seconds < 90) return `${seconds} second${seconds === 1 ? "" : "s"}`;
  const minutes = Math.ceil(seconds / 60);
  return `${minutes} minute${minutes === 1 ? "" : "s"}`;
}

// What went wrong, in words for the person at the keyboard.
export function describe(error) {
  if (!(error instanceof ApiError)) return error instanceof Error ? error.message : String(error);
  switch (error.code) {
    case "invalid_credentials":
      return "Wrong password.";
    case "invalid_bootstrap_token":
      return "That bootstrap token is not the right one. Copy it again from the server log, or run `codex-lb admin bootstrap-token`.";
    case "invalid_totp_code":
      return "That code is wrong, expired or already used. Wait for the next code in your authenticator app and try again.";
    case "rate_limited":
      return `Too many failed attempts. Try again in ${waitWords(error.retryAfter)}.`;
    case "unauthorized":
      return "Your session has ended. Log in again.";
    case "totp_required":
      return "Enter the code from your authenticator app to finish logging in.";
    case "csrf_rejected":
      return "The request was refused because it did not come from this dashboard's address.";
    case "store_unavailable":
      return "codex-lb cannot reach its Redis right now, so nothing was saved. Try again shortly.";
    case "password_already_configured":
      return "A password is already set. Log in with it.";
    default:
      return error.message;
  }
}
