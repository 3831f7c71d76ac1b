"""The real Codex CLI in tests: installed by scripts/codex-cli, run with ``codex exec``.

``run_codex`` writes ``$CODEX_HOME/config.toml`` with a custom provider (``codexlb``) whose
``base_url`` is the fake's ``{root}/codex`` or the proxy's ``{root}/backend-api/codex``, and
turns off whatever would reach the internet: the update check (api.github.com), analytics and
OpenTelemetry metrics (ab.chatgpt.com) and the plugins feature (api.github.com, chatgpt.com).
With an API key the CLI sends ``Authorization: Bearer <key>`` (provider ``env_key``); without
one it uses ChatGPT auth from ``$CODEX_HOME/auth.json`` (``requires_openai_auth``) and sends
``chatgpt-account-id`` too.

What the CLI sends on ``POST {base_url}/responses`` (0.171.0): headers ``session-id``,
``thread-id`` and ``x-client-request-id`` (all the thread's UUID), ``x-codex-window-id``
(``<thread>:0``), ``x-codex-turn-metadata`` (JSON), ``originator: codex_exec``, a
``codex_exec/<version>`` User-Agent; the body's ``prompt_cache_key`` is the thread's UUID too,
and ``client_metadata`` repeats the ids. ``codex exec resume --last`` keeps all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALLER = ROOT / "scripts" / "codex-cli"
API_KEY_ENV = "CODEX_LB_API_KEY"
MODEL = "gpt-5.1-codex"
INSTALL_TIMEOUT = 600


@dataclasses.dataclass
class CodexResult:
    stdout: str
    stderr: str
    returncode: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@functools.cache
def codex_binary() -> str | None:
    """The pinned ``codex`` (installed on first use), or None when npm is absent.

    ``CODEX_LB_CODEX_BINARY`` names another binary. A failed install raises: only a machine
    without npm skips the Codex CLI tests.
    """
    override = os.environ.get("CODEX_LB_CODEX_BINARY")
    if override:
        return override
    if shutil.which("npm") is None:
        return None
    run = subprocess.run(
        [str(INSTALLER)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    binary = run.stdout.strip()
    if run.returncode != 0 or not binary:
        raise RuntimeError(f"scripts/codex-cli failed ({run.returncode}):\n{run.stderr}")
    return binary


def config_toml(base_url: str, *, api_key: bool, chatgpt_base_url: str | None = None) -> str:
    """The CODEX_HOME config: the ``codexlb`` provider at ``base_url``, nothing else online."""
    lines = [
        f'model = "{MODEL}"',
        'model_provider = "codexlb"',
        "check_for_update_on_startup = false",
    ]
    if chatgpt_base_url is not None:
        # ChatGPT auth also calls {chatgpt_base_url}/api/codex/... (account check, settings).
        lines.append(f'chatgpt_base_url = "{chatgpt_base_url}"')
    lines += [
        "",
        "[analytics]",
        "enabled = false",
        "",
        "[feedback]",
        "enabled = false",
        "",
        "[otel]",
        'exporter = "none"',
        'metrics_exporter = "none"',
        "",
        "[features]",
        "plugins = false",
        "",
        "[model_providers.codexlb]",
        'name = "codex-lb"',
        f'base_url = "{base_url}"',
        'wire_api = "responses"',
        f'env_key = "{API_KEY_ENV}"' if api_key else "requires_openai_auth = true",
    ]
    return "\n".join(lines) + "\n"


def codex_command(binary: str, prompt: str, *, resume: bool = False) -> list[str]:
    """``codex exec`` (a new thread) or ``codex exec resume --last`` (the newest in the cwd)."""
    command = [binary, "exec"]
    if resume:
        command += ["resume", "--last"]
    return [*command, "--skip-git-repo-check", "--strict-config", prompt]


def run_codex(
    binary: str,
    base_url: str,
    prompt: str,
    home: Path,
    api_key: str | None,
    resume: bool = False,
    timeout: float = 60,
    *,
    chatgpt_base_url: str | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> CodexResult:
    """One ``codex exec`` turn with ``CODEX_HOME=home``; its final answer is on stdout.

    The working directory is ``home/work``, the same for every call, since ``resume --last``
    picks the newest thread of the working directory. Without ``api_key``, ``home`` must hold
    an ``auth.json``. On timeout the CLI's whole process group is killed and the result has
    returncode -9 and whatever was printed so far.
    """
    home.mkdir(parents=True, exist_ok=True)
    workdir = home / "work"
    workdir.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        config_toml(base_url, api_key=api_key is not None, chatgpt_base_url=chatgpt_base_url)
    )
    child_env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CODEX_", "OPENAI_")) and name != API_KEY_ENV
    }
    child_env.update({"CODEX_HOME": str(home), "NO_COLOR": "1", "RUST_LOG": "error"})
    if api_key is not None:
        child_env[API_KEY_ENV] = api_key
    child_env.update(env or {})
    command = codex_command(binary, prompt, resume=resume)
    command[-1:-1] = list(extra_args)
    proc = subprocess.Popen(
        command,
        cwd=workdir,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the npm shim runs the native binary as its child
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return CodexResult(stdout, stderr + f"\n[killed after {timeout} s]", -9)
    return CodexResult(stdout, stderr, proc.returncode)
