"""Request and response bodies of ``/api/accounts``."""

from __future__ import annotations

from service.core.bodies import ResponseBody


class AccountView(ResponseBody):
    id: str
    chatgpt_account_id: str
    email: str
    plan_type: str | None
    status: str
    primary_used_percent: float | None
    primary_reset_at: str | None
    secondary_used_percent: float | None
    secondary_reset_at: str | None
    last_used_at: str | None


class AccountList(ResponseBody):
    accounts: list[AccountView]


class ImportResult(ResponseBody):
    filename: str
    status: str
    account: AccountView


class ImportResults(ResponseBody):
    results: list[ImportResult]
