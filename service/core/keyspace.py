"""Every Redis key and channel of a deployment, under its prefix, in one place.

Each feature's store owns what it keeps under its names; they are listed together because a
few writes must see across features (a settings loss is told apart from a brand-new deployment
by the other features' keys; the TOTP secret changes in one step with the settings record) and
because a newcomer reads the whole layout here.
"""

from __future__ import annotations


class Keyspace:
    def __init__(self, prefix: str):
        self.prefix = prefix
        # settings: the record + version, its history, its channel
        self.settings = f"{prefix}settings"
        self.settings_history = f"{prefix}settings:history"
        self.settings_channel = f"{prefix}ch:settings"
        # processes: a sorted set of worker ids, and one expiring record per worker
        self.workers = f"{prefix}workers"
        # dashboard authentication
        self.auth = f"{prefix}auth"  # hash: password_hash, totp_secret (sealed)
        self.totp_pending = f"{prefix}auth:totp_pending"
        self.totp_last_step = f"{prefix}auth:totp_last_step"
        self.bootstrap = f"{prefix}auth:bootstrap"
        self.key_fingerprint = f"{prefix}meta:key_fingerprint"
        self.sessions = f"{prefix}sessions"
        self.session = f"{prefix}session:"  # + token hash
        self.failed = f"{prefix}failed:"  # + ip:<address> | all
        # API keys: one hash of records, a version counter, an epoch, a channel
        self.apikeys = f"{prefix}apikeys"
        self.apikeys_version = f"{prefix}apikeys:version"
        self.apikeys_epoch = f"{prefix}apikeys:epoch"
        self.apikeys_channel = f"{prefix}ch:apikeys"
        # accounts, cold: one hash per account, an index set, a version counter, an epoch
        self.accounts = f"{prefix}accounts"
        self.accounts_version = f"{prefix}accounts:version"
        self.accounts_epoch = f"{prefix}accounts:epoch"
        self.account = f"{prefix}account:"  # + account id
        self.accounts_channel = f"{prefix}ch:accounts"
        # accounts, hot: one hash per account that has learned something, and a channel
        self.account_state = f"{prefix}account_state:"  # + account id
        self.account_state_channel = f"{prefix}ch:account_state"
        # proxy routing shared by processes: thread pins (by a hash of the thread id), the
        # round-robin counter
        self.pin = f"{prefix}pin:"  # + sha256 of the thread id, hex
        self.round_robin = f"{prefix}round_robin"
        # requests on their way to an account near the end of its units: a sorted set per
        # account, member a request id, score when it was sent
        self.reserve = f"{prefix}reserve:"  # + account id
        # proxied requests: the request log (a capped stream, newest last) and the usage
        # summary's rolling counters (one hash per hour, expiring)
        self.request_log = f"{prefix}request_log"
        self.usage_hour = f"{prefix}usage:"  # + hours since the epoch
        # one-at-a-time work and idempotent writes
        self.lease = f"{prefix}lease:"  # + lease name
        self.write_id = f"{prefix}write:"  # + random id

    def deployment_evidence(self) -> list[str]:
        """Keys whose presence proves a deployment exists (its settings record aside)."""
        return [self.settings_history, self.auth, self.apikeys, self.accounts]
