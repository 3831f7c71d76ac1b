"""A deployment to inject faults into: one redis-server with append-only persistence (fsync on
every write, so a ``kill -9`` loses nothing it acknowledged), N real ``codex-lb serve`` processes
each reaching it through its own ``TcpProxy`` (so a fault can hit one process's link or all of
them), the fake upstream, a dashboard session, imported accounts and an API key with API-key
authentication on. Used by the fault tests and by ``scripts/bench ops-faults``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.fake_upstream import FakeUpstream, running_fake
from tests.faults.tcp_proxy import TcpProxy
from tests.proxy_support import IMPORT, RESPONSES, answered_by, body, ids_by_name, import_files
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, RedisServer, ServeProcess, base_env

COOKIE = "dashboard_session"
HTTP_TIMEOUT = 10.0
ACCOUNTS = ("acct-a", "acct-b", "acct-c")
# The two fields every PUT must carry (CONTRACT §4).
REQUIRED = ("sticky_threads_enabled", "prefer_earlier_reset_accounts")


class Deployment:
    def __init__(
        self,
        server: RedisServer,
        proxies: list[TcpProxy],
        serves: list[ServeProcess],
        fake: FakeUpstream,
        prefix: str,
        reconcile_seconds: float,
        env: dict[str, str],
    ):
        self.redis = server
        self.proxies = proxies
        self.serves = serves
        self.fake = fake
        self.prefix = prefix
        self.reconcile_seconds = reconcile_seconds
        # The environment of the processes, Redis reached directly (for more processes and
        # for ``codex-lb admin``).
        self.env = env
        self.clients = [httpx.Client(base_url=s.url, timeout=HTTP_TIMEOUT) for s in serves]
        self.token = ""
        self.key = ""
        self.ids: dict[str, str] = {}
        self._prefer = False  # prefer_earlier_reset_accounts as last written by ``toggle``

    def close(self) -> None:
        for client in self.clients:
            client.close()

    # --- set-up ---------------------------------------------------------------------------------

    def set_up(self, accounts: Sequence[str]) -> None:
        """Password, accounts (each answering once), an API key, API-key auth on."""
        r = self.clients[0].post(
            "/api/dashboard-auth/password/setup",
            json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
        )
        assert r.status_code == 200, r.text
        self.token = r.cookies[COOKIE]
        r = self.admin("POST", IMPORT, files=import_files(self.fake, list(accounts)))
        assert r.status_code == 200, r.text
        self.ids = ids_by_name(r.json())
        r = self.admin("POST", "/api/api-keys", json={"name": "faults"})
        assert r.status_code == 201, r.text
        self.key = str(r.json()["key"])
        version = self.put_settings(
            api_key_auth_enabled=True, routing_strategy="round_robin", sticky_threads_enabled=True
        ).json()["version"]
        assert self.wait_versions(version, 5.0) is not None, self.versions()
        # Every process sees every account (the accounts copy is fed like the settings one).
        for i in range(len(self.serves)):
            seen: set[str] = set()
            deadline = time.monotonic() + 10
            while seen != set(accounts):
                assert time.monotonic() < deadline, f"process {i}: only {seen} answered"
                r = self.ask(i)
                if r.status_code == 200:
                    seen.add(answered_by(r.json()["output"][0]["content"][0]["text"]))
                else:
                    time.sleep(0.02)

    # --- HTTP ---------------------------------------------------------------------------------

    def admin(self, method: str, path: str, i: int = 0, **kwargs: Any) -> httpx.Response:
        """A dashboard call on process ``i`` with the session cookie (and the process's own
        Origin, as a browser would send on a write)."""
        headers = {"Cookie": f"{COOKIE}={self.token}", "Origin": self.serves[i].url}
        return self.clients[i].request(method, path, headers=headers, **kwargs)

    def put_settings(self, i: int = 0, **changes: Any) -> httpx.Response:
        """PUT /api/settings on process ``i``: the two required fields as they are, plus
        ``changes``. Reads the current ones from the same process (last-known-good)."""
        current = self.admin("GET", "/api/settings", i).json()
        wanted = {k: current[k] for k in REQUIRED}
        wanted.update(changes)
        return self.admin("PUT", "/api/settings", i, json=wanted)

    def toggle(self, i: int = 0) -> httpx.Response:
        """A PUT on process ``i`` that changes something (prefer_earlier_reset_accounts flips),
        sent whole without a GET first, so it can be tried while Redis is away."""
        wanted = not self._prefer
        r = self.admin(
            "PUT",
            "/api/settings",
            i,
            json={"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": wanted},
        )
        if r.status_code == 200:
            self._prefer = wanted
        return r

    def ready(self, i: int) -> httpx.Response:
        return self.clients[i].get("/health/ready")

    def versions(self) -> list[int | None]:
        """The settings version each process applied, from /health/ready (no Redis involved)."""
        out: list[int | None] = []
        for i in range(len(self.serves)):
            try:
                out.append(self.ready(i).json()["settings_version"])
            except (httpx.HTTPError, ValueError, KeyError):
                out.append(None)
        return out

    def wait_versions(self, version: int, timeout: float) -> float | None:
        """Seconds until every process reports ``version`` (polled every 10 ms), or None."""
        started = time.monotonic()
        while True:
            if all(v == version for v in self.versions()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.01)

    def ask(
        self, i: int, thread: str | None = None, *, stream: bool = False, timeout: float = 10.0
    ) -> httpx.Response:
        """One Responses request with the API key on process ``i`` (a thread's turn if
        ``thread``); a streamed answer is read to its end."""
        headers = {"Authorization": f"Bearer {self.key}"}
        if thread is not None:
            headers["session_id"] = thread
        client = self.clients[i % len(self.clients)]
        payload = body(stream=stream)
        if not stream:
            return client.post(RESPONSES, json=payload, headers=headers, timeout=timeout)
        with client.stream(
            "POST", RESPONSES, json=payload, headers=headers, timeout=timeout
        ) as response:
            response.read()
        return response

    # --- faults ---------------------------------------------------------------------------------

    def raw(self) -> redis.Redis:
        """A client straight to redis-server (not through a proxy), for checks."""
        return self.redis.client()

    def cut(self) -> None:
        """Redis unreachable from every process: links cut, new connections refused."""
        for proxy in self.proxies:
            proxy.drop("all", refuse=True)

    def mend(self) -> None:
        for proxy in self.proxies:
            proxy.restore()

    def kill_redis(self) -> None:
        """``kill -9`` of redis-server; ``start_redis`` brings it back on its port and dir."""
        self.redis.kill()

    def start_redis(self) -> None:
        self.redis.start()


@dataclass
class Traffic:
    """Proxy requests sent without pause from ``threads`` client threads, each its own
    conversation (``session_id``), over every process in turn; every outcome is counted."""

    deployment: Deployment
    threads: int = 3
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    served_by: dict[str, list[str]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Traffic:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            self._workers.append(worker)
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Until ``count`` more requests have been answered."""
        target = self.total + count
        deadline = time.monotonic() + timeout
        while self.total < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _run(self, n: int) -> None:
        thread = f"faults-{uuid.uuid4().hex[:8]}"
        turn = 0
        while not self._stop.is_set():
            stream = turn % 2 == 1
            try:
                r = self.deployment.ask(n + turn, thread, stream=stream)
                outcome = str(r.status_code)
                ok = r.status_code == 200 and (
                    b"response.completed" in r.content if stream else bool(r.json()["output"])
                )
                if ok and not stream:
                    name = answered_by(r.json()["output"][0]["content"][0]["text"])
                    with self._lock:
                        self.served_by.setdefault(thread, []).append(name)
                failure = None if ok else f"{r.status_code} {r.text[:200]}"
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                outcome, failure = type(exc).__name__, repr(exc)
            with self._lock:
                self.statuses[outcome] += 1
                if failure is not None:
                    self.failures.append(failure)
            turn += 1


@contextlib.contextmanager
def deployment(
    workdir: Path,
    *,
    processes: int = 3,
    accounts: Sequence[str] = ACCOUNTS,
    reconcile_seconds: float = 0.2,
    fake: FakeUpstream | None = None,
) -> Iterator[Deployment]:
    """A set-up ``Deployment`` while inside; everything it started is stopped afterwards."""
    with contextlib.ExitStack() as stack:
        if fake is None:
            fake = stack.enter_context(running_fake())
        server = RedisServer(appendonly=True, appendfsync="always").start()
        stack.callback(server.stop)
        proxies = []
        for _ in range(processes):
            proxy = TcpProxy(server.port).start()
            stack.callback(proxy.close)
            proxies.append(proxy)
        prefix = f"faults:{uuid.uuid4().hex[:8]}:"
        env = base_env(
            server.url,
            prefix,
            workdir,
            CODEX_LB_UPSTREAM_BASE_URL=fake.url,
            CODEX_LB_AUTH_BASE_URL=fake.url,
            CODEX_LB_SETTINGS_RECONCILE_SECONDS=str(reconcile_seconds),
        )
        serves: list[ServeProcess] = []
        for proxy in proxies:
            serve = ServeProcess({**env, "CODEX_LB_REDIS_URL": proxy.url()}, log_dir=workdir)
            stack.callback(serve.terminate, 20)
            serves.append(serve)
        for serve in serves:
            serve.wait_ready()
        d = Deployment(server, proxies, serves, fake, prefix, reconcile_seconds, env)
        stack.callback(d.close)
        d.set_up(accounts)
        yield d
