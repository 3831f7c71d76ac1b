"""A deployment for client tests: one real ``codex-lb serve`` process in front of the fake
upstream, with accounts imported, an API key created and API-key authentication on, driven
over loopback HTTP as a real client would (the dashboard API with a session cookie)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.fake_upstream import FakeUpstream, running_fake
from tests.proxy_support import IMPORT, RESPONSES, answered_by, body, ids_by_name, import_files
from tests.support import BOOTSTRAP_TOKEN, PASSWORD, ServeProcess, base_env

COOKIE = "dashboard_session"
HTTP_TIMEOUT = 15.0


class Deployment:
    """``serve`` (logged in as the dashboard admin) and the fake it forwards to."""

    def __init__(self, serve: ServeProcess, fake: FakeUpstream):
        self.serve = serve
        self.fake = fake
        self.http = httpx.Client(base_url=serve.url, timeout=HTTP_TIMEOUT)
        self.ids: dict[str, str] = {}  # fake account name -> our account id
        self.key = ""

    @property
    def url(self) -> str:
        return self.serve.url

    def close(self) -> None:
        self.http.close()

    def login(self) -> None:
        r = self.http.post(
            "/api/dashboard-auth/password/setup",
            json={"password": PASSWORD, "bootstrap_token": BOOTSTRAP_TOKEN},
        )
        assert r.status_code == 200, r.text
        assert r.cookies.get(COOKIE)  # kept by the client from now on

    def add_accounts(self, *names: str) -> None:
        r = self.http.post(IMPORT, files=import_files(self.fake, list(names)))
        assert r.status_code == 200, r.text
        self.ids.update(ids_by_name(r.json()))

    def create_key(self, name: str = "client-tests") -> str:
        r = self.http.post("/api/api-keys", json={"name": name})
        assert r.status_code == 201, r.text
        key: str = r.json()["key"]
        assert key.startswith("sk-clb-")
        return key

    def settings(self, **changes: Any) -> dict[str, Any]:
        """``PUT /api/settings?wait=true``: answered once every process applied it."""
        current = self.http.get("/api/settings").json()
        required = ("sticky_threads_enabled", "prefer_earlier_reset_accounts")
        wanted = {k: current[k] for k in required}
        wanted.update(changes)
        r = self.http.put("/api/settings?wait=true", json=wanted)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def ask(self, key: str | None = None, **extra: Any) -> str:
        """One non-streamed Responses request; the fake account that answered it."""
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        r = self.http.post(RESPONSES, json=body(stream=False, **extra), headers=headers)
        assert r.status_code == 200, r.text
        return answered_by(r.json()["output"][0]["content"][0]["text"])

    def warm_up(self) -> None:
        """Until every imported account has answered once (round robin, not sticky), so the
        process's live copy holds them all before a test counts on it."""
        self.settings(routing_strategy="round_robin", sticky_threads_enabled=False)
        seen: set[str] = set()
        deadline = time.monotonic() + 10
        while seen != set(self.ids):
            assert time.monotonic() < deadline, f"only {seen} of {set(self.ids)} answered"
            r = self.http.post(RESPONSES, json=body(stream=False))
            if r.status_code == 200:
                seen.add(answered_by(r.json()["output"][0]["content"][0]["text"]))
            else:
                assert r.status_code == 503, r.text  # no_accounts: the import not seen yet
                time.sleep(0.02)

    def require_keys(self, **changes: Any) -> None:
        """API-key auth on (with other settings), then wait until a keyless request is 401."""
        self.settings(api_key_auth_enabled=True, **changes)
        deadline = time.monotonic() + 5
        while True:
            r = httpx.get(f"{self.url}/v1/models", timeout=HTTP_TIMEOUT)
            if r.status_code == 401:
                assert r.json()["error"]["code"] == "invalid_api_key", r.text
                return
            assert time.monotonic() < deadline, f"keyless still admitted: {r.status_code}"
            time.sleep(0.02)


@contextlib.contextmanager
def deployment(
    redis_url: str,
    prefix: str,
    data_dir: Path,
    names: tuple[str, ...],
    fake: FakeUpstream | None = None,
    **settings: Any,
) -> Iterator[Deployment]:
    """A ready deployment: ``names`` imported (each answered once), a key in ``.key``, API-key
    auth on and ``settings`` applied. Its Redis keys (under ``prefix``) are removed afterwards."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if fake is None:
            fake = stack.enter_context(running_fake())
        env = base_env(
            redis_url,
            prefix,
            data_dir,
            CODEX_LB_UPSTREAM_BASE_URL=fake.url,
            CODEX_LB_AUTH_BASE_URL=fake.url,
        )
        stack.callback(_forget, redis_url, prefix)  # last, once serve has stopped
        serve = ServeProcess(env, log_dir=data_dir)
        stack.callback(serve.terminate, 20)
        serve.wait_ready()
        d = Deployment(serve, fake)
        stack.callback(d.close)
        d.login()
        d.add_accounts(*names)
        d.key = d.create_key()
        d.warm_up()
        d.require_keys(**settings)
        yield d


def _forget(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


class ConnectRecorder:
    """A stand-in HTTP(S) proxy on loopback that refuses everything and remembers where each
    client wanted to go (``CONNECT host:443`` for HTTPS): given to a client as ``HTTPS_PROXY``
    and ``HTTP_PROXY``, it shows every attempt to reach a host other than those in
    ``NO_PROXY``, on a machine whose network is closed anyway."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}"
        return {
            **{name: url for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")},
            **{name: "127.0.0.1,localhost" for name in ("NO_PROXY", "no_proxy")},
            "ALL_PROXY": "",
            "all_proxy": "",
        }

    def __enter__(self) -> ConnectRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def hosts(self) -> set[str]:
        """The hosts asked for (``CONNECT host:port`` or an absolute ``http://host/`` URL)."""
        out = set()
        for line in self.targets:
            parts = line.split()
            target = parts[1] if len(parts) > 1 else line
            target = target.removeprefix("http://").removeprefix("https://")
            out.add(target.split("/")[0].rsplit(":", 1)[0])
        return out

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0]
                    self.targets.append(first.decode("latin-1"))
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass
