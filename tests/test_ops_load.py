"""A short version of ``scripts/bench ops-load``'s load run: three real serve processes under
concurrent streams while the settings change every second. No 5xx, exactly one request-log
entry per request, and every request routed by a settings version within the contract's hard
propagation bound."""

from __future__ import annotations

from bench.ops_load import RECONCILE_SECONDS, load_run
from bench.proxy_load import fake_upstream


def test_a_load_run_while_settings_change() -> None:
    with fake_upstream() as fake:
        env = {
            "CODEX_LB_UPSTREAM_BASE_URL": fake.url,
            "CODEX_LB_AUTH_BASE_URL": fake.url,
            "CODEX_LB_SETTINGS_RECONCILE_SECONDS": str(RECONCILE_SECONDS),
        }
        run = load_run(fake, env, seconds=6.0, streams=30)
    assert run.load.sent > 100
    assert dict(run.load.errors) == {}
    assert run.settings_changes >= 5
    assert run.entries == run.load.sent
    assert run.entry_statuses == {200: run.load.sent}
    assert run.routed == run.entries
    assert run.late_hard == 0
