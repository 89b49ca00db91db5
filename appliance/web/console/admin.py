"""Admin pages: accounts, credits and the audit log (with its exports)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from appliance.accounts.accounts import MAX_CREDITS, Account
from appliance.accounts.audit import Actor, AuditFilter, to_csv, to_json
from appliance.accounts.service import AccountService, SignInService
from appliance.core.clock import utc_now
from appliance.core.errors import ApplianceError, BadRequest, NotFound
from appliance.core.numbers import row_id, whole_number
from appliance.web.console.pages import Form, flash, take_flash
from appliance.web.console.rendering import page
from appliance.web.console.security import actor, admins_only
from appliance.web.dependencies import Accounts, Audit, SignIn

AUDIT_PAGE_ROWS = 200


@dataclass
class NewAccountForm:
    email: str = ""
    password: str = ""
    credits: str = "0"
    admin: str = ""  # a checkbox: "on" when ticked


@dataclass
class CreditsForm:
    amount: str = ""
    reason: str = ""


def form_number(text: str, what: str, low: int, high: int) -> int:
    try:
        return whole_number(text.strip(), low, high)
    except ValueError as problem:
        raise BadRequest(f"{what}: {problem}") from None


def account_in_path(text: str) -> int:
    """The account id an address names. Read as text: a route's `int` takes what int()
    takes ("٣", "1_0") and any size."""
    number = row_id(text)
    if number is None:
        raise NotFound(f"no account with id {text[:40]!r}")
    return number


def detail_fields(details: str | None) -> list[tuple[str, str]]:
    """An audit row's details (JSON text) as name/value pairs a person reads; text that is
    not a JSON object stays one unnamed value."""
    if not details:
        return []
    try:
        parsed = json.loads(details)
    except ValueError:
        return [("", details)]
    if not isinstance(parsed, dict):
        return [("", details)]
    return [(name, value if isinstance(value, str) else json.dumps(value))
            for name, value in parsed.items()]


def admin_actor(request: Request[Account, Any, Any]) -> Actor:
    return actor(request, by=request.user.email)


class AdminPages(Controller):
    path = "/admin"
    guards = [admins_only]
    include_in_schema = False

    @get("/accounts", name="console.admin.accounts", sync_to_thread=True)
    def account_list(self, request: Request[Account, Any, Any],
                     accounts: Accounts, signin: SignIn) -> Template:
        return self._accounts_page(request, accounts, signin, flash=take_flash(request))

    @post("/accounts", sync_to_thread=True)
    def create_account(self, request: Request[Account, Any, Any],
                       data: Annotated[NewAccountForm, Form],
                       accounts: Accounts, signin: SignIn) -> Template | Redirect:
        try:
            created = accounts.create(
                data.email, data.password, admin_actor(request), is_admin=data.admin == "on",
                credits=form_number(data.credits or "0", "Credits", 0, MAX_CREDITS))
        except ApplianceError as exc:
            return self._accounts_page(request, accounts, signin, status_code=exc.status,
                                       error=exc.message, form=data)
        flash(request, f"Created {'admin ' if created.is_admin else ''}account {created.email}"
                       f" with {created.credits} credits.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:str}/disable", sync_to_thread=True)
    def disable(self, request: Request[Account, Any, Any], account_id: FromPath[str],
                accounts: Accounts) -> Redirect:
        number = account_in_path(account_id)
        if number == request.user.id:
            raise BadRequest("You cannot disable your own account")
        account = accounts.set_disabled(number, True, admin_actor(request))
        flash(request, f"Disabled {account.email}: its keys and sign-ins stop working.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:str}/enable", sync_to_thread=True)
    def enable(self, request: Request[Account, Any, Any], account_id: FromPath[str],
               accounts: Accounts) -> Redirect:
        account = accounts.set_disabled(account_in_path(account_id), False, admin_actor(request))
        flash(request, f"Enabled {account.email} again.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:str}/admin", sync_to_thread=True)
    def make_admin(self, request: Request[Account, Any, Any], account_id: FromPath[str],
                   accounts: Accounts) -> Redirect:
        account = accounts.make_admin(account_in_path(account_id), admin_actor(request))
        flash(request, f"{account.email} is now an administrator.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:str}/credits", sync_to_thread=True)
    def credits(self, request: Request[Account, Any, Any], account_id: FromPath[str],
                data: Annotated[CreditsForm, Form], accounts: Accounts,
                signin: SignIn) -> Template | Redirect:
        try:
            account = accounts.get(account_in_path(account_id))
            amount = form_number(data.amount, "The amount", -MAX_CREDITS, MAX_CREDITS)
            reason = data.reason.strip()
            if not reason:
                raise BadRequest("Say why, for the ledger: the reason is required")
            balance = accounts.grant_credits(account.email, amount, admin_actor(request),
                                             reason=reason)
        except ApplianceError as exc:
            return self._accounts_page(request, accounts, signin, status_code=exc.status,
                                       error=exc.message)
        verb = "Granted" if amount > 0 else "Removed"
        flash(request, f"{verb} {abs(amount)} credits {'to' if amount > 0 else 'from'}"
                       f" {account.email}; the balance is now {balance}.")
        return Redirect("/console/admin/accounts", status_code=303)

    @post("/accounts/{account_id:str}/unlock", sync_to_thread=True)
    def unlock(self, request: Request[Account, Any, Any], account_id: FromPath[str],
               accounts: Accounts, signin: SignIn) -> Redirect:
        number = account_in_path(account_id)
        forgotten = signin.unlock(number, admin_actor(request))
        flash(request, f"Unlocked sign-in for {accounts.get(number).email}: {forgotten} failed"
                       f" sign-in{'s' * (forgotten != 1)} forgotten.")
        return Redirect("/console/admin/accounts", status_code=303)

    @staticmethod
    def _accounts_page(request: Request[Account, Any, Any], accounts: AccountService,
                       signin: SignInService, status_code: int = 200,
                       **context: Any) -> Template:
        return page(request, "admin_accounts.html", status_code=status_code,
                    accounts=accounts.all(), form=context.pop("form", NewAccountForm()),
                    throttled=signin.throttled_emails(), **context)

    @get("/audit", name="console.admin.audit", sync_to_thread=True)
    def audit_log(self, request: Request[Account, Any, Any], audit: Audit,
                  account: FromQuery[str] = "", action: FromQuery[str] = "",
                  since: FromQuery[str] = "", until: FromQuery[str] = "") -> Template:
        where = AuditFilter(account=account, action=action, since=since, until=until)
        try:
            entries = audit.query(where, limit=AUDIT_PAGE_ROWS + 1)
            error = None
        except ApplianceError as exc:
            entries, error = [], exc.message
        return page(request, "admin_audit.html", status_code=400 if error else 200,
                    entries=entries[:AUDIT_PAGE_ROWS], more=len(entries) > AUDIT_PAGE_ROWS,
                    where=where, actions=audit.actions(), error=error, fields=detail_fields,
                    query=request.scope.get("query_string", b"").decode("latin-1"))

    @get("/audit/export", sync_to_thread=True)
    def audit_export(self, request: Request[Account, Any, Any], audit: Audit,
                     format: FromQuery[Literal["csv", "json"]] = "csv",
                     account: FromQuery[str] = "", action: FromQuery[str] = "",
                     since: FromQuery[str] = "", until: FromQuery[str] = "") -> Response[str]:
        where = AuditFilter(account=account, action=action, since=since, until=until)
        entries = audit.query(where)
        stamp = utc_now()[:19].replace(":", "").replace("-", "")
        if format == "json":
            body, media_type = to_json(entries), "application/json"
        else:
            body, media_type = to_csv(entries), "text/csv; charset=utf-8"
        return Response(body, media_type=media_type, headers={
            "Content-Disposition": f'attachment; filename="audit-{stamp}.{format}"'})
