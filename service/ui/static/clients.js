// How to point the Codex CLI and the OpenAI SDK at this server, filled in with its address.
import { h, replace, uid, copyButton } from "./dom.js";

function snippet(title, text, intro) {
  const id = uid("snippet");
  return h(
    "section",
    { "aria-labelledby": id },
    h("h2", { id }, title),
    intro,
    h("pre", { tabindex: "0", "aria-label": title }, h("code", {}, text)),
    h("div", { class: "actions" }, copyButton(`Copy ${title}`, () => text)),
  );
}

export async function render(view) {
  const origin = location.origin;
  const toml = `model_provider = "codex-lb"
check_for_update_on_startup = false

[model_providers.codex-lb]
name = "codex-lb"
base_url = "${origin}/backend-api/codex"
wire_api = "responses"
env_key = "CODEX_LB_API_KEY"
`;
  const python = `from openai import OpenAI

client = OpenAI(base_url="${origin}/v1", api_key="sk-clb-...")  # your API key
print(client.responses.create(model="gpt-5.1-codex", input="Say hello").output_text)
`;
  const shell = `export CODEX_LB_API_KEY=sk-clb-...   # your API key
export OPENAI_BASE_URL=${origin}/v1
`;
  replace(
    view,
    h("h1", {}, "Client set-up"),
    h("p", {}, "Clients reach the pool at ", h("code", {}, origin), ". Create an API key on the ", h("a", { href: "#/keys" }, "API keys"), " page first if “Require API keys” is on."),
    snippet("Codex CLI config.toml", toml, h("p", {}, "Put this in ", h("code", {}, "~/.codex/config.toml"), ", and the key in the variable ", h("code", {}, "env_key"), " names.")),
    snippet("Environment", shell, h("p", {}, "For the Codex CLI and any client that reads these variables.")),
    snippet("OpenAI SDK (Python)", python, h("p", {}, "Any OpenAI SDK works the same way: the base URL and an API key.")),
  );
}
